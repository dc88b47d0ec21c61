package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.List;
import org.qdedup.format.Be;
import org.qdedup.format.FormatException;
import org.qdedup.format.Geometry;
import org.qdedup.format.Header;
import org.qdedup.format.L2Entry;
import org.qdedup.format.Snapshot;
import org.qdedup.format.SubclusterType;
import org.qdedup.io.BlockFile;

/**
 * Read side of a qcow2 image: cluster mapping through L1/L2, compressed clusters, subclusters, data files,
 * fall-through to the backing device. Opened on the active layer or on one internal snapshot.
 */
public final class Qcow2Image implements WritableDevice {
    private final BlockFile file;
    private final BlockFile dataFile;
    private volatile Header header;
    private final Geometry geo;
    final long[] l1;
    private volatile long size;
    private final BlockDevice backing;
    private final List<Snapshot> snapshots;
    final L2Cache l2Cache;
    /** Metadata lock: L1, L2 tables, refcounts and the header change only under it. */
    final java.util.concurrent.locks.ReentrantLock meta = new java.util.concurrent.locks.ReentrantLock();
    /**
     * Held shared by every guest I/O from mapping to the end of its data transfer, and exclusively while freed
     * clusters become reusable, so no in-flight read or write lands on a cluster handed to someone else.
     */
    final java.util.concurrent.locks.ReentrantReadWriteLock ioGate = new java.util.concurrent.locks.ReentrantReadWriteLock();
    private Qcow2Writer writer;
    private final Refcounts refcounts;
    private final long l1Offset;
    private volatile Boolean metadataPreallocated;

    Qcow2Image(BlockFile file, BlockFile dataFile, Header header, long l1Offset, long[] l1, long size, BlockDevice backing,
               List<Snapshot> snapshots) {
        this.file = file;
        this.dataFile = dataFile;
        this.header = header;
        this.geo = new Geometry(header.clusterBits(), header.extendedL2());
        this.l1 = l1;
        this.size = size;
        this.backing = backing;
        this.snapshots = snapshots;
        this.l2Cache = new L2Cache((int) Math.max(16, (32L << 20) / header.clusterSize()));
        this.refcounts = new Refcounts(file, header);
        this.l1Offset = l1Offset;
    }

    public Header header() {
        return header;
    }

    void header(Header h) {
        this.header = h;
    }

    void size(long s) {
        this.size = s;
    }

    /** Host offset of the L1 table this device reads (the active one, or a snapshot's). */
    long l1Offset() {
        return l1Offset;
    }

    /** The writer, when the image was opened read-write (else null). */
    public Qcow2Writer writer() {
        return writer;
    }

    void writer(Qcow2Writer w) {
        this.writer = w;
    }

    public Geometry geometry() {
        return geo;
    }

    public List<Snapshot> snapshots() {
        return snapshots;
    }

    public BlockFile dataFile() {
        return dataFile;
    }

    public Refcounts refcounts() {
        return refcounts;
    }

    @Override
    public String name() {
        return file.name();
    }

    @Override
    public String format() {
        return "qcow2";
    }

    @Override
    public long size() {
        return size;
    }

    @Override
    public BlockDevice backing() {
        return backing;
    }

    @Override
    public boolean prefersLargeReads() {
        return dataFile.readsAroundCache();
    }

    @Override
    public BlockFile file() {
        return file;
    }

    @Override
    public long allocatedBytes() throws IOException {
        // qemu-img 7.2 counts the image file alone, not an external data file.
        return file.allocatedBytes();
    }

    /** A run of guest bytes with one mapping type and, where it applies, contiguous host offsets. */
    public record Mapping(SubclusterType type, long length, long hostOffset, long l2Entry) {
    }

    /**
     * Maps guest bytes from {@code offset} (at most {@code maxLen}, never past one L2 table) as qcow2_get_host_offset
     * does. A compressed cluster is returned alone.
     */
    public Mapping map(long offset, long maxLen) throws IOException {
        long cs = geo.clusterSize();
        long sc = geo.subclusterSize();
        long l2End = (offset / geo.bytesPerL2() + 1) * geo.bytesPerL2();
        long limit = Math.min(maxLen, l2End - offset);
        int l1i = geo.l1Index(offset);
        long l1e = l1i < l1.length ? l1[l1i] : 0;
        long l2Offset = l1e & L2Entry.L1_OFFSET_MASK;
        if (l2Offset == 0) {
            return new Mapping(SubclusterType.UNALLOCATED_PLAIN, limit, 0, 0);
        }
        long[] l2 = l2Table(l2Offset, l1i);
        int idx = geo.l2Index(offset);
        int step = geo.extendedL2() ? 2 : 1;
        long entry = l2[idx * step];
        long bitmap = geo.extendedL2() ? l2[idx * step + 1] : 0;
        int sci = geo.subclusterIndex(offset);
        SubclusterType type = classify(entry, bitmap, sci, offset, l2Offset, idx);
        long inCluster = geo.offsetInCluster(offset);
        if (type == SubclusterType.COMPRESSED) {
            return new Mapping(type, Math.min(limit, cs - inCluster), 0, entry);
        }
        boolean hasHost = type == SubclusterType.NORMAL || type == SubclusterType.ZERO_ALLOC
                || type == SubclusterType.UNALLOCATED_ALLOC;
        long host = hasHost ? L2Entry.hostOffset(entry) + inCluster : 0;
        // Extend over following subclusters and clusters of the same type (and contiguous host offsets).
        long len = (sci + 1) * sc - inCluster;
        long expectNextHost = hasHost ? host + len : 0;
        int curIdx = idx, curSc = sci + 1;
        while (len < limit) {
            if (curSc >= (geo.extendedL2() ? 32 : 1)) {
                curIdx++;
                curSc = 0;
                if (curIdx >= geo.l2Entries()) {
                    break;
                }
                entry = l2[curIdx * step];
                bitmap = geo.extendedL2() ? l2[curIdx * step + 1] : 0;
            }
            long guest = offset - inCluster + (long) (curIdx - idx) * cs + curSc * sc;
            SubclusterType t = classify(entry, bitmap, curSc, guest, l2Offset, curIdx);
            if (t != type) {
                break;
            }
            if (hasHost && L2Entry.hostOffset(entry) + curSc * sc != expectNextHost) {
                break;
            }
            len += sc;
            expectNextHost += sc;
            curSc++;
        }
        return new Mapping(type, Math.min(len, limit), host, entry);
    }

    private SubclusterType classify(long entry, long bitmap, int sci, long guest, long l2Offset, int idx) throws IOException {
        SubclusterType t = L2Entry.classify(entry, bitmap, geo.extendedL2(), header.hasDataFile(), sci);
        long reserved = L2Entry.reservedBits(entry, geo.extendedL2());
        if (reserved != 0) {
            throw FormatException.of(name(), String.format("L2 entry at offset %d (L2 table %d, index %d, guest offset %d): "
                    + "expected reserved bits clear, found 0x%x", l2Offset + (long) idx * geo.l2EntrySize(), l2Offset, idx,
                    geo.clusterStart(guest), reserved));
        }
        if ((t == SubclusterType.NORMAL || t == SubclusterType.ZERO_ALLOC || t == SubclusterType.UNALLOCATED_ALLOC)
                && geo.offsetInCluster(L2Entry.hostOffset(entry)) != 0) {
            // QEMU calls this corruption too: reading it would take data from the middle of another cluster.
            throw FormatException.of(name(), String.format("L2 entry at offset %d (guest offset %d): expected a "
                    + "cluster-aligned host offset, found 0x%x", l2Offset + (long) idx * geo.l2EntrySize(),
                    geo.clusterStart(guest), L2Entry.hostOffset(entry)));
        }
        if ((t == SubclusterType.ZERO_PLAIN || t == SubclusterType.ZERO_ALLOC) && header.version() < 3) {
            throw FormatException.of(name(), String.format("L2 entry at offset %d (guest offset %d): zero flag in a "
                    + "version 2 image (a reserved bit there)", l2Offset + (long) idx * geo.l2EntrySize(), geo.clusterStart(guest)));
        }
        if (t == SubclusterType.INVALID) {
            throw FormatException.of(name(), String.format("extended L2 entry at offset %d (guest offset %d): "
                    + "invalid subcluster bitmap 0x%016x", l2Offset + (long) idx * geo.l2EntrySize(), geo.clusterStart(guest), bitmap));
        }
        if (t == SubclusterType.COMPRESSED) {
            if (header.hasDataFile()) {
                throw FormatException.of(name(), String.format("L2 entry at offset %d (guest offset %d): "
                        + "compressed cluster in an image with an external data file", l2Offset + (long) idx * geo.l2EntrySize(),
                        geo.clusterStart(guest)));
            }
            if (geo.extendedL2() && bitmap != 0) {
                throw FormatException.of(name(), String.format("extended L2 entry at offset %d (guest offset %d): "
                        + "expected bitmap 0 on a compressed cluster, found 0x%016x", l2Offset + (long) idx * geo.l2EntrySize(),
                        geo.clusterStart(guest), bitmap));
            }
        } else if (header.hasDataFile() && (t == SubclusterType.NORMAL || t == SubclusterType.ZERO_ALLOC
                || t == SubclusterType.UNALLOCATED_ALLOC) && L2Entry.hostOffset(entry) != geo.clusterStart(guest)) {
            throw FormatException.of(name(), String.format("L2 entry at offset %d: external data file cluster offset %d "
                    + "does not match guest cluster offset %d", l2Offset + (long) idx * geo.l2EntrySize(),
                    L2Entry.hostOffset(entry), geo.clusterStart(guest)));
        }
        return t;
    }

    /** Loads (through the cache) and validates the L2 table an L1 entry names. */
    long[] l2Table(long l2Offset, int l1Index) throws IOException {
        long[] t = l2Cache.get(l2Offset);
        if (t != null) {
            return t;
        }
        long l1e = l1[l1Index];
        long l1At = l1Offset + 8L * l1Index;
        if ((l1e & L2Entry.L1_RESERVED) != 0 || (l2Offset & (geo.clusterSize() - 1)) != 0) {
            throw FormatException.at(name(), "L1 entry " + l1Index, l1At, "reserved bits clear and a cluster-aligned L2 offset",
                    String.format("0x%016x", l1e));
        }
        long fsize = file.size();
        if (l2Offset > fsize - geo.clusterSize()) {
            throw FormatException.at(name(), "L1 entry " + l1Index, l1At, "an L2 table inside the file (" + fsize + " bytes)",
                    "L2 table offset " + l2Offset);
        }
        byte[] raw = new byte[(int) geo.clusterSize()];
        file.readFully(ByteBuffer.wrap(raw), l2Offset);
        t = new long[raw.length / 8];
        for (int i = 0; i < t.length; i++) {
            t[i] = Be.u64(raw, i * 8);
        }
        l2Cache.put(l2Offset, t);
        return t;
    }

    @Override
    public void read(ByteBuffer dst, long offset) throws IOException {
        checkReadRange(offset, dst.remaining());
        ioGate.readLock().lock();
        try {
            readLocked(dst, offset);
        } finally {
            ioGate.readLock().unlock();
        }
    }

    /**
     * Data clusters go to the sink as ranges of the data file; the I/O gate is held throughout, so no cluster
     * mapped here is freed, reused or punched before the sink is done with it.
     */
    @Override
    public void readTo(long offset, long len, ReadSink sink, ByteBuffer scratch) throws IOException {
        checkReadRange(offset, len);
        ioGate.readLock().lock();
        try {
            long pos = offset, end = offset + len;
            while (pos < end) {
                Mapping m = mapLocked(pos, end - pos);
                long n = m.length();
                if (m.type() == SubclusterType.NORMAL) {
                    sink.file(dataFile, m.hostOffset(), n);
                } else {
                    n = Math.min(n, scratch.capacity());
                    ByteBuffer part = scratch.clear().limit((int) n);
                    transfer(m, part, pos); // fills [0, n) whether or not it moves the position
                    sink.bytes(part.position(0));
                }
                pos += n;
            }
        } finally {
            ioGate.readLock().unlock();
        }
    }

    private void checkReadRange(long offset, long len) throws IOException {
        if (offset < 0 || offset > size || len > size - offset) {
            throw new IOException(name() + ": read of " + len + " bytes at " + offset + " past the virtual size " + size);
        }
    }

    /** {@link #map} under the metadata lock. */
    private Mapping mapLocked(long pos, long maxLen) throws IOException {
        meta.lock();
        try {
            return map(pos, maxLen);
        } finally {
            meta.unlock();
        }
    }

    /** Guest read for a caller holding {@link #ioGate}; maps under the metadata lock, transfers data outside it. */
    void readLocked(ByteBuffer dst, long offset) throws IOException {
        long pos = offset;
        boolean gather = dst.remaining() >= org.qdedup.io.FileBlockFile.DIRECT_MIN && dataFile.readsAroundCache();
        while (dst.hasRemaining()) {
            Mapping m = mapLocked(pos, dst.remaining());
            int n = (int) m.length();
            if (gather && m.type() == SubclusterType.NORMAL && n < org.qdedup.io.FileBlockFile.DIRECT_MIN) {
                n = readGathered(dst, pos, m);
            } else {
                transfer(m, dst.slice(dst.position(), n), pos);
            }
            dst.position(dst.position() + n);
            pos += n;
        }
    }

    /** Largest stretch of the data file one gathered read covers, and the largest unwanted gap it reads over. */
    private static final int GATHER_SPAN = 4 << 20, GATHER_GAP = 64 << 10;
    private static final ThreadLocal<ByteBuffer> GATHER_BUFFER = new ThreadLocal<>();

    /**
     * Reads a run of small data pieces that lie close together and in order in the data file (a fragmented image,
     * small clusters between L2 tables, data between zero clusters) with one read of the stretch that holds them,
     * when that file is read around the page cache: there no readahead joins them, and one small direct read each
     * would wait on the disk each time. Zero clusters met on the way (and unallocated ones without a backing file)
     * are filled in place. Returns the bytes of {@code dst} (from its position, guest offset {@code pos}) it filled.
     */
    private int readGathered(ByteBuffer dst, long pos, Mapping first) throws IOException {
        int base = dst.position(), end = dst.limit();
        long spanStart = first.hostOffset(), spanEnd = spanStart + first.length();
        long[] runs = new long[3 * 16]; // (offset in dst, host offset, length) per piece
        int nRuns = 0;
        runs[nRuns++] = base;
        runs[nRuns++] = spanStart;
        runs[nRuns++] = first.length();
        int at = base + (int) first.length();
        while (at < end) {
            Mapping m = mapLocked(pos + at - base, end - at);
            int n = (int) m.length();
            SubclusterType t = m.type();
            if (t == SubclusterType.ZERO_PLAIN || t == SubclusterType.ZERO_ALLOC || (backing == null
                    && (t == SubclusterType.UNALLOCATED_PLAIN || t == SubclusterType.UNALLOCATED_ALLOC))) {
                zero(dst.slice(at, n));
            } else if (t == SubclusterType.NORMAL && n < org.qdedup.io.FileBlockFile.DIRECT_MIN
                    && m.hostOffset() >= spanEnd && m.hostOffset() - spanEnd <= GATHER_GAP
                    && m.hostOffset() + n - spanStart <= GATHER_SPAN) {
                if (nRuns + 3 > runs.length) {
                    runs = java.util.Arrays.copyOf(runs, nRuns * 2);
                }
                runs[nRuns++] = at;
                runs[nRuns++] = m.hostOffset();
                runs[nRuns++] = n;
                spanEnd = m.hostOffset() + n;
            } else {
                break; // the caller maps this piece again and reads it its own way
            }
            at += n;
        }
        if (nRuns == 3) {
            dataFile.readFully(dst.slice(base, (int) first.length()), spanStart);
            return at - base;
        }
        int need = (int) (spanEnd - spanStart);
        ByteBuffer span = GATHER_BUFFER.get();
        if (span == null || span.capacity() < need) {
            span = org.qdedup.io.Buffers.direct((need + (1 << 20) - 1) & -(1 << 20)); // as large as used: fresh memory costs
            GATHER_BUFFER.set(span);
        }
        dataFile.readFully(span.clear().limit(need), spanStart);
        for (int i = 0; i < nRuns; i += 3) {
            dst.put((int) runs[i], span, (int) (runs[i + 1] - spanStart), (int) runs[i + 2]);
        }
        return at - base;
    }

    /** Fills {@code part} (at most the mapping's length) with the guest bytes at {@code pos} that {@code m} maps. */
    private void transfer(Mapping m, ByteBuffer part, long pos) throws IOException {
        switch (m.type()) {
            case NORMAL -> dataFile.readFully(part, m.hostOffset());
            case ZERO_PLAIN, ZERO_ALLOC -> zero(part);
            case UNALLOCATED_PLAIN, UNALLOCATED_ALLOC -> readBacking(part, pos);
            case COMPRESSED -> readCompressed(part, pos, m.l2Entry());
            default -> throw new IllegalStateException(m.type().toString());
        }
    }

    private void readBacking(ByteBuffer part, long pos) throws IOException {
        if (backing == null || pos >= backing.size()) {
            zero(part);
            return;
        }
        long avail = backing.size() - pos;
        if (avail >= part.remaining()) {
            backing.read(part, pos);
        } else {
            backing.read(part.slice(0, (int) avail), pos);
            zero(part.slice((int) avail, part.remaining() - (int) avail));
        }
    }

    private void readCompressed(ByteBuffer part, long pos, long entry) throws IOException {
        long coff = L2Entry.compressedOffset(entry, geo.clusterBits());
        int clen = L2Entry.compressedLength(entry, geo.clusterBits());
        long fsize = file.size();
        if (coff >= fsize) {
            long l2At = (l1[geo.l1Index(pos)] & L2Entry.L1_OFFSET_MASK) + (long) geo.l2Index(pos) * geo.l2EntrySize();
            throw FormatException.at(name(), "compressed cluster descriptor in L2 entry (guest offset "
                    + geo.clusterStart(pos) + ")", l2At, "compressed data inside the file (" + fsize + " bytes)",
                    "host offset " + coff);
        }
        byte[] src = new byte[clen];
        file.readFully(ByteBuffer.wrap(src), coff);
        byte[] out = new byte[(int) geo.clusterSize()];
        String err = Compression.decompress(header.compressionType(), src, clen, out);
        if (err != null) {
            throw FormatException.of(name(), "compressed cluster at host offset " + coff + " (guest offset "
                    + geo.clusterStart(pos) + "): " + err);
        }
        part.put(part.position(), out, (int) geo.offsetInCluster(pos), part.remaining());
    }

    private static void zero(ByteBuffer b) {
        if (b.hasArray()) {
            java.util.Arrays.fill(b.array(), b.arrayOffset() + b.position(), b.arrayOffset() + b.limit(), (byte) 0);
        } else {
            java.lang.foreign.MemorySegment.ofBuffer(b).fill((byte) 0); // one memset, not a loop of puts
        }
    }

    @Override
    public LayerStatus status(long offset, long length) throws IOException {
        Mapping m;
        meta.lock();
        try {
            m = map(offset, length);
        } finally {
            meta.unlock();
        }
        int flags = 0;
        long host = 0;
        BlockFile f = null;
        switch (m.type()) {
            case NORMAL -> {
                flags = LayerStatus.DATA | LayerStatus.OFFSET_VALID;
                host = m.hostOffset();
                f = dataFile;
            }
            case ZERO_ALLOC -> {
                flags = LayerStatus.ZERO | LayerStatus.OFFSET_VALID;
                host = m.hostOffset();
                f = dataFile;
            }
            case UNALLOCATED_ALLOC -> {
                flags = LayerStatus.OFFSET_VALID;
                host = m.hostOffset();
                f = dataFile;
            }
            case ZERO_PLAIN -> flags = LayerStatus.ZERO;
            case COMPRESSED -> flags = LayerStatus.DATA;
            default -> flags = 0;
        }
        if ((flags & LayerStatus.DATA) != 0 && (flags & LayerStatus.OFFSET_VALID) != 0 && metadataPreallocated()) {
            flags |= LayerStatus.RECURSE;
        }
        return new LayerStatus(m.length(), flags, host, f);
    }

    /**
     * QEMU's heuristic (qcow2_detect_metadata_preallocation): far more clusters have a refcount than the host
     * file has allocated, so data clusters may be holes and block status asks the file.
     */
    private boolean metadataPreallocated() throws IOException {
        Boolean b = metadataPreallocated;
        if (b == null) {
            long realClusters = file.allocatedBytes() / header.clusterSize();
            long threshold = Math.max(realClusters * 10 / 9, realClusters + 2);
            long endCluster = (file.size() + header.clusterSize() - 1) / header.clusterSize();
            meta.lock(); // the refcount cache is the writer's too
            try {
                b = refcounts.countInUse(endCluster, threshold) >= threshold;
            } catch (org.qdedup.format.FormatException e) {
                // As QEMU: a refcount structure that cannot be read only means "not preallocated" here; reading
                // guest data does not depend on refcounts (check reports them).
                b = false;
            } finally {
                meta.unlock();
            }
            metadataPreallocated = b;
        }
        return b;
    }

    private Qcow2Writer requireWriter() throws IOException {
        if (writer == null) {
            throw new IOException(name() + ": image is open read-only");
        }
        return writer;
    }

    @Override
    public void write(ByteBuffer src, long offset) throws IOException {
        requireWriter().write(src, offset);
    }

    @Override
    public void writeZeroes(long offset, long length, boolean unmap) throws IOException {
        requireWriter().writeZeroes(offset, length, unmap);
    }

    @Override
    public void discard(long offset, long length) throws IOException {
        requireWriter().discard(offset, length);
    }

    @Override
    public void flush() throws IOException {
        if (writer != null) {
            writer.flush();
        }
    }

    private boolean closed;

    @Override
    public void close() throws IOException {
        if (closed) {
            return;
        }
        closed = true;
        try {
            if (writer != null) {
                writer.close();
            }
        } finally {
            closeFiles();
        }
    }

    private void closeFiles() throws IOException {
        try {
            if (backing != null) {
                backing.close();
            }
        } finally {
            try {
                if (dataFile != file) {
                    dataFile.close();
                }
            } finally {
                file.close();
            }
        }
    }
}
