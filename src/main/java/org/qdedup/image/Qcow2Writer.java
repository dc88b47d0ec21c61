package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import org.qdedup.dedup.DedupIndex;
import org.qdedup.dedup.DedupSidecar;
import org.qdedup.dedup.Deduplicator;
import org.qdedup.format.Be;
import org.qdedup.format.Features;
import org.qdedup.format.Geometry;
import org.qdedup.format.Header;
import org.qdedup.format.HeaderExtension;
import org.qdedup.format.L2Entry;
import org.qdedup.format.SubclusterType;
import org.qdedup.io.BlockFile;
import org.qdedup.io.FileBlockFile;

/**
 * The write side of a qcow2 image: allocation, copy-on-write, zeroing, discard and the ordered metadata flush.
 *
 * <p><b>Write ordering</b> (all of it lives in {@link #writeBack}): (1) refcount increments and guest data are
 * written and synced (new refcount blocks first, then their table entries: {@link Refcounts#writeDirty}); (2) then
 * the L2 tables that publish the new clusters are written (and synced) and only then the L1 entries that point at
 * new L2 tables; (3) only after that, refcount decrements of clusters whose entries were removed are applied and
 * written. A crash therefore leaks clusters at worst: an entry never points
 * at a cluster whose refcount is not on disk, or whose data is not, and a freed cluster is never reused while a
 * durable entry still points at it.
 *
 * <p><b>Failures</b> (see docs/reliability.md): a failed write, truncate or punch-hole (a full disk, an I/O error)
 * fails the request that met it and leaves the open image usable: a data write's new clusters are given back
 * before anything points at them, and metadata that could not be written stays dirty in the caches, written again
 * at the next write-back; what is on disk meanwhile is a state the write ordering allows at any crash. A failed
 * fsync, a failed header write or a refcount table moved in RAM but not on disk makes the image unusable for
 * writing: the kernel may have dropped unsynced pages, so a sync that succeeds later proves nothing.
 */
public final class Qcow2Writer {
    private final Qcow2Image img;
    private final BlockFile file;
    private final BlockFile dataFile;
    private final Geometry geo;
    private final Refcounts rc;
    private final long cs;
    private final TreeSet<Integer> dirtyL1 = new TreeSet<>();
    private volatile IOException failed;
    /** Online dedup, when the image has it enabled (null otherwise). */
    private Deduplicator dedup;
    private boolean dedupLoaded;
    /** Shared clusters whose refcount fell back to 1: their one remaining active entry gets COPIED again. */
    private final java.util.Set<Long> copiedFixes = new java.util.LinkedHashSet<>();
    /** What the writer did, for tests and metrics. */
    private final Stats stats = new Stats();

    /** Counters of structural events. */
    public static final class Stats {
        public long l2TablesAllocated, l2TablesCopied, sharedClustersCopied, compressedClustersRewritten;
    }

    public Stats stats() {
        return stats;
    }
    private boolean headerPrepared;

    Qcow2Writer(Qcow2Image img) {
        this.img = img;
        this.file = img.file();
        this.dataFile = img.dataFile();
        this.geo = img.geometry();
        this.rc = img.refcounts();
        this.cs = geo.clusterSize();
        rc.onTableMoved((off, clusters) -> updateHeader(img.header().withRefcountTable(off, clusters)));
        rc.onFatal(e -> failed = e);
        rc.onAllocate((cluster, count) -> guardMetadata(cluster * cs, count * cs, "an allocation"));
        if (img.header().dedup() && !img.header().hasDataFile()) {
            dedup = new Deduplicator(new Deduplicator.RefcountPort() {
                @Override
                public long refcount(long cluster) throws IOException {
                    return rc.get(cluster);
                }

                @Override
                public long maxRefcount() {
                    return rc.maxRefcount();
                }
            }, 1024, img.header().dedupHeadroom());
            rc.onDrop((c, v) -> {
                if (v == 0) {
                    dedup.freed(c);
                } else if (v == 1) {
                    copiedFixes.add(c);
                }
            });
            indexFileHeader = img.header();
            try {
                indexFileStamp = indexFileHeader.dedupIndexInSync() ? file.stamp() : null;
            } catch (IOException e) {
                indexFileStamp = null; // not trusted: the index is rebuilt
            }
        }
    }

    // ---- the dedup index file ----------------------------------------------------------------------------------
    //
    // Ordering, the one rule that keeps the index file from ever being trusted wrongly: the image's header says
    // "index file in sync" (our autoclear bit plus the file's generation) only between a clean close and the next
    // change. Before the first write of a session the bit is cleared and the header synced (prepareHeader), before
    // any data or metadata changes; at a clean close everything is flushed, then the header gets the bit and a
    // new generation (synced), then the index file is written with that generation and the image file's stamp
    // (size, inode, ctime, mtime) taken after the header write. A crash anywhere leaves either the bit clear or a
    // generation the index file does not have: rebuild. QEMU clears the bit when it opens the image read-write; a
    // writer that does not (a read-only QEMU reopened for writing) still changes the file's times or size.

    /**
     * The header and file stamp at open, before any write of ours: the index file is judged against them when the
     * index is first needed, so an open that never writes does not read the index file at all.
     */
    private Header indexFileHeader;
    private org.qdedup.io.FileStamp indexFileStamp;
    /** Where the index of this session came from, for check and stats. */
    private String indexSource = "not loaded yet";

    private volatile java.util.function.LongConsumer rebuildProgress = n -> { };

    /**
     * Receives the bytes of data clusters read so far while the dedup index is rebuilt by scanning the image, for
     * progress displays (called from several threads).
     */
    public void onDedupRebuildProgress(java.util.function.LongConsumer bytesRead) {
        rebuildProgress = bytesRead;
    }

    /** What {@link #dedupInPlace} did. */
    public record InPlaceResult(long clustersExamined, long clustersShared, long zeroClusters) {
    }

    /**
     * Dedups the active layer in place (an image QEMU made, say): every data cluster that only the active layer
     * uses and whose content a cluster at a lower host offset also holds is pointed at that one (refcount + 1,
     * confirmed byte for byte, within the refcount ceiling) and released; data clusters of zeros become the zero
     * flag. The space comes back to the host file (holes, truncation) at the flush that follows.
     *
     * @param progressBytes receives the bytes of guest clusters examined so far
     */
    public InPlaceResult dedupInPlace(java.util.function.LongConsumer progressBytes) throws IOException {
        if (dedup == null) {
            throw new IOException(img.name() + ": dedup is not enabled on this image");
        }
        checkUsable();
        long examined = 0, shared = 0, zeros = 0;
        img.ioGate.writeLock().lock();
        try {
            img.meta.lock();
            try {
                loadDedupIndex();
                byte[] mine = new byte[(int) cs];
                byte[] theirs = new byte[(int) cs];
                long[] cands = new long[16];
                for (int i = 0; i < img.l1.length; i++) {
                    long l2 = img.l1[i] & L2Entry.L1_OFFSET_MASK;
                    if (l2 == 0) {
                        continue;
                    }
                    for (int j = 0; j < geo.l2Entries(); j++) {
                        long pos = ((long) i * geo.l2Entries() + j) * cs;
                        if (pos >= img.size()) {
                            break;
                        }
                        long[] t = img.l2Table(img.l1[i] & L2Entry.L1_OFFSET_MASK, i);
                        long e = t[j * step()];
                        long h = ownedHost(e);
                        if (L2Entry.isCompressed(e) || h < 0 || (e & L2Entry.ZERO) != 0 || (geo.extendedL2()
                                && t[j * step() + 1] != L2Entry.BITMAP_ALL_ALLOC) || rc.get(h / cs) != 1) {
                            continue;
                        }
                        examined++;
                        progressBytes.accept(examined * cs);
                        dataFile.readFully(ByteBuffer.wrap(mine), h);
                        if (isZero(mine, 0)) {
                            zeroCluster(pos, true);
                            zeros++;
                            continue;
                        }
                        long hc = h / cs;
                        if (!dedup.index().containsCluster(hc)) {
                            continue;
                        }
                        int n = dedup.index().candidatesOfFragment(dedup.index().fragmentOfCluster(hc), cands);
                        java.util.Arrays.sort(cands, 0, n);
                        for (int k = 0; k < n && cands[k] < hc; k++) {
                            long c = cands[k];
                            dataFile.readFully(ByteBuffer.wrap(theirs), c * cs);
                            if (java.util.Arrays.equals(mine, theirs) && dedup.canShare(c)) {
                                shareInto(writableL2(i), pos, c);
                                shared++;
                                break;
                            }
                        }
                        maybeWriteBack();
                    }
                }
            } finally {
                img.meta.unlock();
            }
        } finally {
            img.ioGate.writeLock().unlock();
        }
        return new InPlaceResult(examined, shared, zeros);
    }

    private volatile boolean sharing = true;

    /**
     * Whether new writes may share clusters (on by default). Off (serve --no-dedup), writes store their own
     * clusters, but the index still follows every change, so it stays right for when sharing is on again.
     */
    public void dedupSharing(boolean on) {
        sharing = on;
    }

    /** Entries in the dedup index now (0 before it is loaded). */
    public int dedupIndexEntries() {
        return dedup == null ? 0 : dedup.index().size();
    }

    /** Where this session's dedup index came from: the index file, or a scan of the image (and why). */
    public String dedupIndexSource() {
        return dedup == null ? "dedup off" : indexSource;
    }

    /**
     * Reads every indexed cluster and counts the entries whose content no longer matches their key: stale
     * entries, which must always be zero (every share is confirmed by bytes anyway).
     */
    public long staleDedupEntries() throws IOException {
        if (dedup == null) {
            return 0;
        }
        img.meta.lock();
        try {
            loadDedupIndex();
            long[] stale = {0};
            byte[] buf = new byte[(int) cs];
            IOException[] err = {null};
            dedup.index().forEach((frag, cluster) -> {
                if (err[0] != null) {
                    return;
                }
                try {
                    dataFile.readFully(ByteBuffer.wrap(buf), cluster * cs);
                } catch (IOException e) {
                    err[0] = e;
                    return;
                }
                if (DedupIndex.fragment(org.qdedup.dedup.Sha256.of(buf, 0, buf.length)) != frag) {
                    stale[0]++;
                }
            });
            if (err[0] != null) {
                throw err[0];
            }
            return stale[0];
        } finally {
            img.meta.unlock();
        }
    }

    /** After a clean close: marks the header in sync with a new generation, then writes the index file. */
    private void persistDedupIndex(Header clean) throws IOException {
        // Any generation no index file has will do: a random one, never 0 or the one before. (SecureRandom would
        // read the JDK's security configuration first: 10-15 ms at every close.)
        long gen;
        do {
            gen = java.util.concurrent.ThreadLocalRandom.current().nextLong();
        } while (gen == 0 || gen == clean.dedupGeneration());
        Header nh = clean.withAutoclear(clean.autoclearFeatures() | Features.AUTOCLEAR_DEDUP_INDEX)
                .withExtension(Header.dedupExtension(clean.dedupHeadroom(), gen));
        if (nh.encodedLength() > cs) {
            nh = nh.withoutExtension(HeaderExtension.FEATURE_NAMES);
        }
        if (nh.encodedLength() > cs) {
            updateHeader(clean);
            return; // no room in the header cluster: the index is rebuilt at the next open
        }
        updateHeader(nh);
        java.nio.file.Path path = DedupSidecar.pathFor(file.location());
        try {
            DedupSidecar.writeAtomically(path, DedupSidecar.encode(nh.clusterBits(), gen, file.stamp(), dedup.index()));
        } catch (IOException e) {
            // The header now names a generation no index file has: the next open rebuilds, as after a crash.
        }
    }

    private Header header() {
        return img.header();
    }

    private void checkUsable() throws IOException {
        if (failed != null) {
            throw new IOException(img.name() + ": image unusable for writing after an earlier failure: " + failed.getMessage(), failed);
        }
    }

    /** Clears autoclear bits we do not maintain (bitmaps, unknown ones) before the first change. */
    private void prepareHeader() throws IOException {
        if (headerPrepared) {
            return;
        }
        Header h = header();
        if (h.corrupt()) {
            throw new IOException(img.name() + ": image is marked corrupt; repair it with 'check -r all' before writing");
        }
        long keep = h.autoclearFeatures() & Features.AUTOCLEAR_DATA_FILE_RAW;
        if (keep != h.autoclearFeatures()) {
            // Persistent bitmaps we would not keep up to date: drop them (their clusters are freed below), so QEMU
            // neither trusts a stale bitmap nor finds their clusters leaked.
            List<Long> bitmapClusters = (h.autoclearFeatures() & Features.AUTOCLEAR_BITMAPS) != 0
                    ? Bitmaps.clusters(file, h) : List.of();
            h = h.withAutoclear(keep).withoutExtension(HeaderExtension.BITMAPS);
            updateHeader(h);
            for (long c : bitmapClusters) {
                rc.deferDecrement(c);
            }
        }
        if (lazy() || (dedup != null && h.version() == 3)) {
            // Refcounts may lag behind the L2 tables from now on: whoever opens the image before we close it
            // cleanly must rebuild them (QEMU does, and so do we). Dedup needs it too: when a cluster becomes
            // shared or stops being shared, its refcount and the COPIED flags of its entries live in different
            // clusters, and no write order keeps both consistent at every instant of a crash.
            updateHeader(h.withIncompatible(h.incompatibleFeatures() | Features.INCOMPAT_DIRTY));
        }
        headerPrepared = true;
    }

    /** Lazy refcounts: refcount blocks are written at guest flushes and close, not before each L2 update. */
    private boolean lazy() {
        return header().lazyRefcounts() && header().version() == 3;
    }

    private void updateHeader(Header h) throws IOException {
        try {
            Images.writeHeader(file, h);
        } catch (IOException e) {
            failed = e; // the header is the root of everything: never go on guessing what it holds on disk
            throw e;
        }
        fsync(file);
        img.header(h);
    }

    /** A sync; its failure is fatal for this open image (see the class comment). */
    private void fsync(BlockFile f) throws IOException {
        try {
            f.flush();
        } catch (IOException e) {
            failed = e;
            throw e;
        }
    }

    /**
     * Writes the data of {@code n} clusters just allocated at {@code host}; when the write fails (a full disk, an
     * I/O error) the clusters are given back before anything refers to them, and the caller's request fails.
     */
    private void writeNewClusters(ByteBuffer src, long host, int n) throws IOException {
        try {
            dataFile.write(src, host);
        } catch (IOException e) {
            rc.free(host, n);
            throw e;
        }
    }

    // ---- guest operations ------------------------------------------------------------------------------------

    /** Writes {@code src.remaining()} guest bytes at {@code offset}. */
    public void write(ByteBuffer src, long offset) throws IOException {
        checkRange(offset, src.remaining());
        img.ioGate.readLock().lock();
        try {
            long pos = offset;
            while (src.hasRemaining()) {
                long inC = geo.offsetInCluster(pos);
                int n;
                if (inC == 0 && src.remaining() >= cs) {
                    long l2End = (pos / geo.bytesPerL2() + 1) * geo.bytesPerL2();
                    n = (int) Math.min(Math.min(src.remaining(), l2End - pos) & -cs, 1L << 30);
                    writeFullClusters(pos, src.slice(src.position(), n));
                } else {
                    n = (int) Math.min(src.remaining(), cs - inC);
                    writePartial(pos, src.slice(src.position(), n));
                }
                src.position(src.position() + n);
                pos += n;
            }
        } finally {
            img.ioGate.readLock().unlock();
        }
    }

    private void checkRange(long offset, long len) throws IOException {
        checkUsable();
        if (offset < 0 || len < 0 || offset > img.size() || len > img.size() - offset) {
            throw new IOException(img.name() + ": request of " + len + " bytes at " + offset + " past the virtual size " + img.size());
        }
    }

    /** An L2 table this writer may change in place, and where it lives. */
    private record L2Ref(long offset, long[] table) {
    }

    /** The L2 table for an L1 index, allocated or copied (when shared with a snapshot) so it can be changed. */
    private L2Ref writableL2(int l1i) throws IOException {
        prepareHeader();
        long l1e = img.l1[l1i];
        long off = l1e & L2Entry.L1_OFFSET_MASK;
        if (off != 0 && (l1e & L2Entry.COPIED) != 0) {
            return new L2Ref(off, img.l2Table(off, l1i));
        }
        long[] t;
        if (off == 0) {
            t = new long[(int) (cs / 8)];
        } else {
            // Shared with a snapshot: copy; the data clusters keep their refcounts (each table path counts once).
            t = img.l2Table(off, l1i).clone();
        }
        long noff = rc.allocate(1);
        if (off == 0) {
            stats.l2TablesAllocated++;
        } else {
            stats.l2TablesCopied++;
        }
        if (l2Clusters != null) {
            if (off != 0) {
                l2Clusters.remove(off / cs);
            }
            l2Clusters.add(noff / cs);
        }
        img.l2Cache.put(noff, t);
        img.l2Cache.markDirty(noff);
        img.l1[l1i] = noff | L2Entry.COPIED;
        dirtyL1.add(l1i);
        if (off != 0) {
            rc.deferDecrement(off / cs);
        }
        return new L2Ref(noff, t);
    }

    private int step() {
        return geo.extendedL2() ? 2 : 1;
    }

    private long entryAt(L2Ref r, int idx) {
        return r.table()[idx * step()];
    }

    private long bitmapAt(L2Ref r, int idx) {
        return geo.extendedL2() ? r.table()[idx * step() + 1] : 0;
    }

    private void setEntry(L2Ref r, int idx, long entry, long bitmap) {
        r.table()[idx * step()] = entry;
        if (geo.extendedL2()) {
            r.table()[idx * step() + 1] = bitmap;
        }
        img.l2Cache.markDirty(r.offset());
    }

    /** Host cluster an entry owns (normal or zero-allocated), or -1. */
    private long ownedHost(long entry) {
        if (L2Entry.isCompressed(entry)) {
            return -1;
        }
        long h = L2Entry.hostOffset(entry);
        boolean owned = h != 0 || (header().hasDataFile() && (entry & L2Entry.COPIED) != 0);
        return owned ? h : -1;
    }

    /** Whether guest data may be written straight into the entry's host cluster. */
    private boolean writableInPlace(long entry) {
        return !L2Entry.isCompressed(entry) && ownedHost(entry) >= 0 && (entry & L2Entry.COPIED) != 0;
    }

    /** Counts copy-on-write of a shared or compressed cluster that new data replaced. */
    private void countCopy(long old, boolean moved) {
        if (!moved) {
            return;
        }
        if (L2Entry.isCompressed(old)) {
            stats.compressedClustersRewritten++;
        } else if (ownedHost(old) >= 0 && (old & L2Entry.COPIED) == 0) {
            stats.sharedClustersCopied++;
        }
    }

    /** {@link #release} for the entry of guest offset {@code pos}, keeping dedup's user sets exact. */
    private void releaseFor(long entry, long pos) throws IOException {
        if (dedup != null) {
            long h = ownedHost(entry);
            if (h >= 0) {
                dedup.released(h / cs, pos / cs);
            }
        }
        release(entry);
    }

    /**
     * Builds the dedup index the first time it is needed: the active L2 tables give every data cluster and its
     * users; the keys come from the index file when it was found in sync at open, else from hashing the data.
     */
    private void loadDedupIndex() throws IOException {
        if (dedupLoaded) {
            return;
        }
        dedupLoaded = true;
        DedupIndexFile.Found found = DedupIndexFile.find(file.location(), indexFileHeader, indexFileStamp);
        DedupSidecar.Contents known = found.contents();
        if (known != null) {
            dedup.index().ensureCapacity(known.clusters().length);
        }
        prefetchL2Tables();
        java.util.BitSet seen = new java.util.BitSet();
        // A cluster past the end of the data file holds nothing to share (a corrupt entry); skipping it also keeps
        // the per-cluster arrays sized by the file, not by whatever an L2 entry says.
        long dataEnd = dataFile.size();
        long[] toHash = new long[64];
        long[] toHashGuest = new long[64];
        int nHash = 0;
        for (int i = 0; i < img.l1.length; i++) {
            long l2 = img.l1[i] & L2Entry.L1_OFFSET_MASK;
            if (l2 == 0) {
                continue;
            }
            long[] t = img.l2Table(l2, i);
            for (int j = 0; j < geo.l2Entries(); j++) {
                long e = t[j * step()];
                long h = ownedHost(e);
                if (L2Entry.isCompressed(e) || h < 0 || (e & L2Entry.ZERO) != 0 || (geo.extendedL2()
                        && t[j * step() + 1] != L2Entry.BITMAP_ALL_ALLOC) || h / cs > DedupIndex.MAX_CLUSTER || h > dataEnd - cs) {
                    continue;
                }
                long guest = (long) i * geo.l2Entries() + j;
                int hc = (int) (h / cs);
                if (seen.get(hc)) {
                    dedup.shared(hc, guest);
                    continue;
                }
                seen.set(hc);
                long key = known != null ? known.keyOf(hc) : -1;
                if (key >= 0) {
                    dedup.storedFragment((int) key, hc, guest);
                    continue;
                }
                if (nHash == toHash.length) {
                    toHash = java.util.Arrays.copyOf(toHash, nHash * 2);
                    toHashGuest = java.util.Arrays.copyOf(toHashGuest, nHash * 2);
                }
                dedup.ownedBy(hc, guest); // before any later user of the cluster is recorded as a sharer
                toHash[nHash] = hc;
                toHashGuest[nHash++] = guest;
            }
        }
        if (nHash > 0) {
            int[] frags = hashClusters(toHash, nHash);
            for (int k = 0; k < nHash; k++) {
                dedup.storedFragment(frags[k], toHash[k], toHashGuest[k]);
            }
        }
        indexSource = known != null ? (nHash == 0 ? "index file" : "index file, " + nHash + " clusters hashed again")
                : "scan of the image (" + found.problem() + ")";
    }

    /**
     * Reads every active L2 table once with many reads in flight, so that the scan that follows finds them in the
     * page cache: on a cold cache the tables are scattered through the file and one read at a time waits for each.
     */
    private void prefetchL2Tables() {
        long[] tables = java.util.Arrays.stream(img.l1).map(e -> e & L2Entry.L1_OFFSET_MASK).filter(o -> o != 0).toArray();
        if (tables.length < 64) {
            return;
        }
        int tableBytes = (int) Math.min(cs, (long) geo.l2Entries() * 8 * step());
        java.util.concurrent.ExecutorService pool = java.util.concurrent.Executors.newFixedThreadPool(16, r -> {
            Thread t = new Thread(r, "l2-prefetch");
            t.setDaemon(true);
            return t;
        });
        try {
            java.util.concurrent.atomic.AtomicInteger next = new java.util.concurrent.atomic.AtomicInteger();
            List<java.util.concurrent.Future<?>> fs = new ArrayList<>();
            for (int w = 0; w < 16; w++) {
                fs.add(pool.submit(() -> {
                    ByteBuffer b = org.qdedup.io.Buffers.direct(tableBytes);
                    for (int i; (i = next.getAndIncrement()) < tables.length; ) {
                        file.read(b.clear(), tables[i]);
                    }
                    return null;
                }));
            }
            for (var f : fs) {
                f.get();
            }
        } catch (Exception e) {
            // only a hint: the scan reads the tables itself
        } finally {
            pool.shutdownNow();
        }
    }

    /** In-RAM keys of the given host clusters, read in host order in large runs and hashed on every core. */
    private int[] hashClusters(long[] clusters, int n) throws IOException {
        Integer[] order = new Integer[n];
        for (int i = 0; i < n; i++) {
            order[i] = i;
        }
        java.util.Arrays.sort(order, (a, b) -> Long.compare(clusters[a], clusters[b]));
        // Runs of adjacent clusters, at most 1 MiB each, are the units of work.
        int maxRun = (int) Math.max(1, (1 << 20) / cs);
        List<int[]> runs = new ArrayList<>();
        for (int i = 0; i < n; ) {
            int j = i + 1;
            while (j < n && j - i < maxRun && clusters[order[j]] == clusters[order[j - 1]] + 1) {
                j++;
            }
            runs.add(new int[]{i, j});
            i = j;
        }
        int[] frags = new int[n];
        java.util.function.LongConsumer progress = rebuildProgress;
        java.util.concurrent.atomic.AtomicLong done = new java.util.concurrent.atomic.AtomicLong();
        try {
            runs.parallelStream().forEach(r -> {
                int len = r[1] - r[0];
                byte[] buf = new byte[(int) (len * cs)];
                try {
                    dataFile.readFully(ByteBuffer.wrap(buf), clusters[order[r[0]]] * cs);
                } catch (IOException e) {
                    throw new java.io.UncheckedIOException(e);
                }
                for (int k = 0; k < len; k++) {
                    frags[order[r[0] + k]] = DedupIndex.fragment(org.qdedup.dedup.Sha256.of(buf, (int) (k * cs), (int) cs));
                }
                progress.accept(done.addAndGet(buf.length));
            });
        } catch (java.io.UncheckedIOException e) {
            throw e.getCause();
        }
        return frags;
    }

    /**
     * One whole guest cluster through dedup (metadata lock held): zeros become the zero flag; content already
     * there, or shown by the backing chain, is not written; content stored elsewhere is shared (refcount + 1,
     * COPIED off on every entry using it); anything else is written and indexed once written. With
     * {@code mayWait}, content that a write in flight is storing is left alone: false, and {@link #conflict} names
     * that write.
     */
    private boolean writeDeduped(long pos, byte[] data, int off, byte[] sha, boolean mayWait) throws IOException {
        loadDedupIndex();
        Deduplicator.Counters n = dedup.counters();
        long guest = pos / cs;
        int len = (int) cs;
        if (isZero(data, off)) {
            n.zeroClusters++;
            zeroCluster(pos, true);
            return true;
        }
        L2Ref r = writableL2(geo.l1Index(pos));
        int idx = geo.l2Index(pos);
        long e = entryAt(r, idx);
        long host = ownedHost(e);
        boolean plain = host >= 0 && !L2Entry.isCompressed(e) && (e & L2Entry.ZERO) == 0
                && (!geo.extendedL2() || bitmapAt(r, idx) == L2Entry.BITMAP_ALL_ALLOC);
        if (plain && dedup.indexedAs(host / cs, sha)) {
            if (dataFile.contentEquals(host, data, off, len)) {
                n.inplaceRewrites++;
                return true; // the same content rewritten in place: nothing to do at all
            }
        }
        if (host < 0 && !L2Entry.isCompressed(e) && (e & L2Entry.ZERO) == 0 && img.backing() != null
                && bitmapAt(r, idx) == 0) {
            byte[] buf = compareBuf();
            long avail = Math.min(cs, Math.max(0, img.backing().size() - pos));
            java.util.Arrays.fill(buf, (byte) 0);
            if (avail > 0) {
                img.backing().read(ByteBuffer.wrap(buf, 0, (int) avail), pos);
            }
            if (java.util.Arrays.equals(buf, 0, len, data, off, off + len)) {
                n.backingEqual++;
                return true; // the backing chain shows this already: keep falling through
            }
        }
        long target = !sharing ? -1 : dedup.find(sha, data, off, len,
                (c, d, o, l) -> dataFile.contentEquals(c * cs, d, o, l));
        if (target >= 0 && target * cs == host) {
            n.inplaceRewrites++;
            return true;
        }
        if (target >= 0) {
            shareInto(r, pos, target);
            return true;
        }
        if (mayWait && sharing && (conflict = storing.get(new HashKey(sha))) != null) {
            return false; // a write in flight is storing this content: the caller waits for it, then looks again
        }
        n.misses++;
        if (plain && writableInPlace(e)) {
            dedup.rewritten(host / cs);
            guardData(host, cs);
            dataFile.write(ByteBuffer.wrap(data, off, len), host);
            setEntry(r, idx, newEntry(host), allAllocBitmap());
            dedup.stored(sha, host / cs, guest);
            return true;
        }
        return false; // needs a new cluster: the caller allocates (in runs) and publishes it
    }

    /** A cluster-sized buffer for reading back what a write is compared with (metadata lock held). */
    private byte[] compareBuf() {
        if (compareBuf == null || compareBuf.length != cs) {
            compareBuf = new byte[(int) cs];
        }
        return compareBuf;
    }

    private byte[] compareBuf;

    /** Per-thread copy of a direct request, so hashing and comparisons run on one array without new allocations. */
    private static final ThreadLocal<byte[]> DEDUP_SCRATCH = new ThreadLocal<>();
    private static final int DEDUP_SCRATCH_MAX = 8 << 20;

    private static int copiesOf(List<int[]> copies, int k) {
        int n = 0;
        for (int[] c : copies) {
            if (c[1] == k) {
                n++;
            }
        }
        return n;
    }

    /** Publishes a newly written (dedup) cluster for guest offset {@code pos} and indexes it. */
    private void publishFresh(L2Ref r, long pos, long host, byte[] sha) throws IOException {
        int idx = geo.l2Index(pos);
        releaseFor(entryAt(r, idx), pos);
        setEntry(r, idx, newEntry(host), allAllocBitmap());
        dedup.stored(sha, host / cs, pos / cs);
    }

    /** Points the entry of guest offset {@code pos} at a cluster holding its content (one more reference). */
    private void shareInto(L2Ref r, long pos, long target) throws IOException {
        dedup.counters().hits++;
        int idx = geo.l2Index(pos);
        long e = entryAt(r, idx);
        long before = rc.get(target);
        rc.add(target, 1);
        if (before == 1) {
            // Shared from now on: the first user's entry must lose COPIED.
            for (long u : dedup.users(target)) {
                setCopied(u, target, false);
            }
        }
        dedup.shared(target, pos / cs);
        releaseFor(e, pos);
        setEntry(r, idx, target * cs, allAllocBitmap());
    }

    private byte[] zeroCluster;

    private boolean isZero(byte[] b, int off) {
        if (zeroCluster == null || zeroCluster.length != cs) {
            zeroCluster = new byte[(int) cs];
        }
        return java.util.Arrays.mismatch(b, off, off + (int) cs, zeroCluster, 0, (int) cs) < 0; // vectorised compare
    }

    /**
     * Sets or clears COPIED on the active entry of a guest cluster, if it (still) points at {@code cluster}; returns
     * whether it does.
     */
    private boolean setCopied(long guestCluster, long cluster, boolean on) throws IOException {
        long pos = guestCluster * cs;
        int l1i = geo.l1Index(pos);
        if (l1i >= img.l1.length) {
            return false;
        }
        long l1e = img.l1[l1i];
        long l2 = l1e & L2Entry.L1_OFFSET_MASK;
        if (l2 == 0) {
            return false;
        }
        long[] t = img.l2Table(l2, l1i);
        int k = geo.l2Index(pos) * step();
        long e = t[k];
        if (L2Entry.isCompressed(e) || ownedHost(e) != cluster * cs) {
            return false;
        }
        if ((l1e & L2Entry.COPIED) == 0) {
            return true; // a table shared with a snapshot: its entries never carry COPIED for shared clusters
        }
        long ne = on ? e | L2Entry.COPIED : e & ~L2Entry.COPIED;
        if (ne != e) {
            t[k] = ne;
            img.l2Cache.markDirty(l2);
        }
        return true;
    }

    /** Dedup counters (null when dedup is off). */
    public Deduplicator.Counters dedupCounters() {
        return dedup == null ? null : dedup.counters();
    }

    /** Queues the refcount drops for what an entry referenced, once the entry is replaced. */
    private void release(long entry) throws IOException {
        if (header().hasDataFile()) {
            return; // external data file clusters have no refcounts
        }
        if (L2Entry.isCompressed(entry)) {
            long off = L2Entry.compressedOffset(entry, geo.clusterBits());
            int len = L2Entry.compressedLength(entry, geo.clusterBits());
            guardMetadata(off, len, "freeing compressed data");
            for (long c = off / cs; c <= (off + len - 1) / cs; c++) {
                rc.deferDecrement(c);
            }
            return;
        }
        long h = ownedHost(entry);
        if (h >= 0) {
            guardMetadata(h, cs, "freeing a data cluster");
            rc.deferDecrement(h / cs);
        }
    }

    private long newEntry(long host) {
        return host | L2Entry.COPIED;
    }

    private long allAllocBitmap() {
        return geo.extendedL2() ? L2Entry.BITMAP_ALL_ALLOC : 0;
    }

    /** Host offset for a cluster's data: in place, or a new cluster. */
    private long allocateData(int n) throws IOException {
        if (header().hasDataFile()) {
            throw new IllegalStateException("data file clusters are allocated at their guest offset");
        }
        return rc.allocate(n);
    }

    /** Whole clusters inside one L2 table. */
    private void writeFullClusters(long pos, ByteBuffer data) throws IOException {
        int n = (int) (data.remaining() / cs);
        if (dedup != null) {
            writeFullClustersDeduped(pos, data, n);
            return;
        }
        img.meta.lock();
        try {
            L2Ref r = writableL2(geo.l1Index(pos));
            int idx0 = geo.l2Index(pos);
            long[] hosts = new long[n];
            int need = 0;
            for (int i = 0; i < n; i++) {
                long e = entryAt(r, idx0 + i);
                if (writableInPlace(e)) {
                    hosts[i] = ownedHost(e);
                } else if (header().hasDataFile()) {
                    hosts[i] = pos + i * cs;
                } else {
                    hosts[i] = -1;
                    need++;
                }
            }
            long next = need > 0 ? allocateData(need) : 0;
            for (int i = 0; i < n; i++) {
                if (hosts[i] < 0) {
                    hosts[i] = next;
                    next += cs;
                }
            }
            // Data first (in runs of contiguous host clusters), then the entries that publish it.
            int i = 0;
            try {
                while (i < n) {
                    int j = i + 1;
                    while (j < n && hosts[j] == hosts[j - 1] + cs) {
                        j++;
                    }
                    guardData(hosts[i], (long) (j - i) * cs);
                    dataFile.write(data.slice((int) (i * cs), (int) ((j - i) * cs)), hosts[i]);
                    i = j;
                }
            } catch (IOException e) {
                if (need > 0 && failed == null) {
                    rc.free(next - need * cs, need); // the new clusters are published by nothing: give them back
                }
                throw e;
            }
            for (i = 0; i < n; i++) {
                long old = entryAt(r, idx0 + i);
                long oldHost = ownedHost(old);
                countCopy(old, oldHost != hosts[i]);
                if (!(writableInPlace(old) && oldHost == hosts[i]) && !(header().hasDataFile() && oldHost == hosts[i])) {
                    release(old);
                }
                setEntry(r, idx0 + i, newEntry(hosts[i]), allAllocBitmap());
            }
            maybeWriteBack();
        } finally {
            img.meta.unlock();
        }
    }

    private void writeFullClustersDeduped(long pos, ByteBuffer data, int n) throws IOException {
        int c = (int) cs;
        int total = n * c;
        byte[] arr;
        int base;
        if (data.hasArray()) {
            arr = data.array();
            base = data.arrayOffset() + data.position();
        } else {
            arr = total <= DEDUP_SCRATCH_MAX ? DEDUP_SCRATCH.get() : null;
            if (arr == null || arr.length < total) {
                arr = new byte[total];
                if (total <= DEDUP_SCRATCH_MAX) {
                    DEDUP_SCRATCH.set(arr);
                }
            }
            data.get(data.position(), arr, 0, total);
            base = 0;
        }
        // Hash before taking the lock, so the cores hash while another write holds it.
        byte[][] hashes = new byte[n][];
        for (int i = 0; i < n; i++) {
            hashes[i] = org.qdedup.dedup.Sha256.of(arr, base + i * c, c);
        }
        // Three steps: (1) under the metadata lock, each cluster is deduped, zeroed or rewritten in place, and the
        // ones that need new space get it (refcount 1, in the cache); (2) their data is written without the lock,
        // so other writes go on meanwhile; (3) under the lock again, entries point at it and the index learns it,
        // only now that the data is written. Until then its hashes are "stored by a write in flight": a write of
        // the same content elsewhere waits for that write, then shares its cluster, as it would had the writes
        // come one after the other. A flush in between writes the refcounts of the new clusters, never an entry
        // pointing at them: a crash there leaks them at worst.
        boolean[] done = new boolean[n];
        int[] fresh = new int[n];
        int nFresh;
        List<int[]> copiesOfFresh = new ArrayList<>();
        long first;
        InFlight mine;
        for (;;) {
            InFlight other = null;
            nFresh = 0;
            copiesOfFresh.clear();
            img.meta.lock();
            try {
                java.util.Map<HashKey, Integer> freshByHash = null;
                for (int i = 0; i < n; i++) {
                    if (done[i]) {
                        continue;
                    }
                    // The same content earlier in this request, still waiting for its new cluster: share that one,
                    // also where this cluster could take the content in place (which would store it twice).
                    Integer pending = freshByHash == null ? null : freshByHash.get(new HashKey(hashes[i]));
                    boolean same = pending != null && java.util.Arrays.equals(arr, base + fresh[pending] * c,
                            base + fresh[pending] * c + c, arr, base + i * c, base + i * c + c);
                    if (same && sharing && dedup.allows(2 + copiesOf(copiesOfFresh, pending))) {
                        copiesOfFresh.add(new int[]{i, pending});
                        continue;
                    }
                    if (writeDeduped(pos + (long) i * c, arr, base + i * c, hashes[i], true)) {
                        done[i] = true;
                        continue;
                    }
                    if (conflict != null) {
                        other = conflict;
                        conflict = null;
                        break;
                    }
                    if (same && dedup.allows(2)) {
                        dedup.counters().ceilingHits++; // this copy is full: the next one starts a fresh target
                    }
                    if (freshByHash == null) {
                        freshByHash = new java.util.HashMap<>();
                    }
                    freshByHash.put(new HashKey(hashes[i]), nFresh);
                    fresh[nFresh++] = i;
                }
                if (other == null) {
                    if (nFresh == 0) {
                        maybeWriteBack();
                        return;
                    }
                    first = allocateData(nFresh);
                    guardData(first, (long) nFresh * c);
                    mine = new InFlight();
                    if (sharing) {
                        for (int j = 0; j < nFresh; j++) {
                            storing.put(new HashKey(hashes[fresh[j]]), mine);
                        }
                    }
                    break;
                }
            } finally {
                img.meta.unlock();
            }
            other.awaitDone(); // then this write looks again at what is still undecided
        }
        try {
            // Each stretch of consecutive new clusters straight from the caller's buffer to its place in the new
            // host run (usually one stretch; gathering them into one buffer cost a copy, and 100 MB of garbage on
            // the ext4 image of bench/ with its duplicates between new clusters).
            for (int j = 0; j < nFresh; ) {
                int k = j + 1;
                while (k < nFresh && fresh[k] == fresh[k - 1] + 1) {
                    k++;
                }
                dataFile.write(data.slice(data.position() + fresh[j] * c, (k - j) * c), first + (long) j * c);
                j = k;
            }
        } catch (IOException | RuntimeException e) {
            img.meta.lock();
            try {
                rc.free(first, nFresh); // nothing points at the run yet: a full disk leaves the image as it was
                stored(mine, hashes, fresh, nFresh); // nothing to share: the waiting writes store their own
            } finally {
                img.meta.unlock();
            }
            throw e;
        }
        img.meta.lock();
        try {
            L2Ref r = writableL2(geo.l1Index(pos));
            for (int j = 0; j < nFresh; j++) {
                int i = fresh[j];
                publishFresh(r, pos + (long) i * c, first + (long) j * c, hashes[i]);
            }
            for (int[] cp : copiesOfFresh) {
                shareInto(r, pos + (long) cp[0] * c, (first + (long) cp[1] * c) / cs);
            }
            maybeWriteBack();
        } finally {
            stored(mine, hashes, fresh, nFresh);
            img.meta.unlock();
        }
    }

    /** A dedup write between allocating its new clusters and publishing them; writes of the same content wait. */
    private static final class InFlight {
        private final java.util.concurrent.CountDownLatch published = new java.util.concurrent.CountDownLatch(1);

        void awaitDone() {
            boolean interrupted = false;
            for (;;) {
                try {
                    published.await();
                    break;
                } catch (InterruptedException e) {
                    interrupted = true;
                }
            }
            if (interrupted) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /** Hashes of new clusters whose data is being written, by the write doing it (metadata lock held). */
    private final java.util.Map<HashKey, InFlight> storing = new java.util.HashMap<>();

    /**
     * A SHA-256 as a map key. ByteBuffer keys hashed all 32 bytes one virtual call at a time, under the metadata lock;
     * the digest's first four bytes are as uniform as any hash of it.
     */
    private record HashKey(byte[] sha) {
        @Override
        public int hashCode() {
            return (sha[0] << 24) | ((sha[1] & 0xff) << 16) | ((sha[2] & 0xff) << 8) | (sha[3] & 0xff);
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof HashKey k && java.util.Arrays.equals(sha, k.sha);
        }
    }

    /** Set by {@link #writeDeduped} when it left a cluster to a write in flight (metadata lock held). */
    private InFlight conflict;

    /** The in-flight write is over (published, or failed): its hashes go, and writes waiting for it go on. */
    private void stored(InFlight w, byte[][] hashes, int[] fresh, int nFresh) {
        for (int j = 0; j < nFresh; j++) {
            storing.remove(new HashKey(hashes[fresh[j]]), w);
        }
        w.published.countDown();
    }

    /** Part of one cluster: in place when possible, else read-modify-write into a new cluster. */
    private void writePartial(long pos, ByteBuffer data) throws IOException {
        long cstart = geo.clusterStart(pos);
        int inC = (int) (pos - cstart);
        img.meta.lock();
        try {
            L2Ref r = writableL2(geo.l1Index(pos));
            int idx = geo.l2Index(pos);
            long e = entryAt(r, idx);
            long b = bitmapAt(r, idx);
            if (dedup != null) {
                // Whole clusters only: read what the write does not cover, then dedup the cluster.
                dedup.counters().unalignedRmw++;
                byte[] full = new byte[(int) cs];
                long avail = Math.min(cs, img.size() - cstart);
                img.readLocked(ByteBuffer.wrap(full, 0, (int) avail), cstart);
                data.duplicate().get(full, inC, data.remaining());
                byte[] sha = org.qdedup.dedup.Sha256.of(full, 0, (int) cs);
                if (!writeDeduped(cstart, full, 0, sha, false)) {
                    long host = allocateData(1);
                    guardData(host, cs);
                    writeNewClusters(ByteBuffer.wrap(full), host, 1);
                    publishFresh(r, cstart, host, sha);
                }
                maybeWriteBack();
                return;
            }
            SubclusterType t = L2Entry.classify(e, b, geo.extendedL2(), header().hasDataFile(), geo.subclusterIndex(pos));
            boolean plainInPlace = writableInPlace(e) && (e & L2Entry.ZERO) == 0
                    && (!geo.extendedL2() || wholeRangeAllocated(b, inC, data.remaining()));
            if (plainInPlace && t == SubclusterType.NORMAL) {
                long host = ownedHost(e) + inC;
                guardData(host, data.remaining());
                dataFile.write(data.duplicate(), host);
                return;
            }
            boolean compressedOrShared = L2Entry.isCompressed(e) || (ownedHost(e) >= 0 && !writableInPlace(e));
            if (geo.extendedL2() && !compressedOrShared && !header().hasDataFile()) {
                writeSubclusters(r, idx, e, b, pos, data);
                maybeWriteBack();
                return;
            }
            // Build the whole cluster as the guest sees it now, then put the new bytes in.
            byte[] full = new byte[(int) cs];
            long avail = Math.min(cs, img.size() - cstart);
            img.readLocked(ByteBuffer.wrap(full, 0, (int) avail), cstart);
            data.duplicate().get(full, inC, data.remaining());
            long host;
            boolean reuse = writableInPlace(e) || header().hasDataFile();
            if (reuse) {
                host = header().hasDataFile() ? cstart : ownedHost(e);
            } else {
                host = allocateData(1);
            }
            guardData(host, cs);
            if (reuse) {
                dataFile.write(ByteBuffer.wrap(full), host);
            } else {
                writeNewClusters(ByteBuffer.wrap(full), host, 1);
            }
            countCopy(e, !reuse);
            if (!reuse) {
                release(e);
            }
            setEntry(r, idx, newEntry(host), allAllocBitmap());
            maybeWriteBack();
        } finally {
            img.meta.unlock();
        }
    }

    /**
     * Extended L2: allocates only the subclusters a partial write touches (reading what the guest sees for the
     * parts of them it does not cover); the others keep falling through to the backing file or reading as zeros.
     */
    private void writeSubclusters(L2Ref r, int idx, long e, long bitmap, long pos, ByteBuffer data) throws IOException {
        long cstart = geo.clusterStart(pos);
        int inC = (int) (pos - cstart);
        int scs = (int) geo.subclusterSize();
        int first = inC / scs, last = (inC + data.remaining() - 1) / scs;
        boolean fresh = ownedHost(e) < 0;
        long host = fresh ? allocateData(1) : ownedHost(e);
        byte[] buf = new byte[(last - first + 1) * scs];
        long start = cstart + (long) first * scs;
        long avail = Math.min(buf.length, img.size() - start);
        boolean covers = inC == first * scs && data.remaining() == buf.length;
        if (!covers) {
            img.readLocked(ByteBuffer.wrap(buf, 0, (int) avail), start);
        }
        data.duplicate().get(buf, inC - first * scs, data.remaining());
        guardData(host + (long) first * scs, buf.length);
        try {
            dataFile.write(ByteBuffer.wrap(buf), host + (long) first * scs);
        } catch (IOException x) {
            if (fresh) {
                rc.free(host, 1);
            }
            throw x;
        }
        long nb = bitmap;
        for (int i = first; i <= last; i++) {
            nb = (nb | L2Entry.subAllocBit(i)) & ~L2Entry.subZeroBit(i);
        }
        setEntry(r, idx, newEntry(host), nb);
    }

    private boolean wholeRangeAllocated(long bitmap, int inC, int len) {
        long sc = geo.subclusterSize();
        for (long o = inC / sc * sc; o < inC + len; o += sc) {
            int i = (int) (o / sc);
            if ((bitmap & L2Entry.subAllocBit(i)) == 0 || (bitmap & L2Entry.subZeroBit(i)) != 0) {
                return false;
            }
        }
        return true;
    }

    /**
     * Makes guest bytes read as zeros. Whole clusters get the zero flag (or become unallocated on v2 without a
     * backing file); with {@code unmap} their host clusters are released, else an owned cluster stays allocated.
     */
    public void writeZeroes(long offset, long len, boolean unmap) throws IOException {
        checkRange(offset, len);
        img.ioGate.readLock().lock();
        try {
            long pos = offset, end = offset + len;
            while (pos < end) {
                long inC = geo.offsetInCluster(pos);
                long n = Math.min(end - pos, cs - inC);
                boolean whole = inC == 0 && (n == cs || pos + n == img.size());
                if (!whole || (header().version() == 2 && img.backing() != null)) {
                    ByteBuffer z = ByteBuffer.allocate((int) n);
                    if (whole) {
                        writeFullOrTail(pos, z);
                    } else {
                        writePartial(pos, z);
                    }
                } else {
                    zeroCluster(pos, unmap);
                }
                pos += n;
            }
        } finally {
            img.ioGate.readLock().unlock();
        }
    }

    private void writeFullOrTail(long pos, ByteBuffer z) throws IOException {
        if (z.remaining() == cs) {
            writeFullClusters(pos, z);
        } else {
            writePartial(pos, z);
        }
    }

    /** Discards guest bytes: they read as zeros afterwards and whole clusters give their space back. */
    public void discard(long offset, long len) throws IOException {
        writeZeroes(offset, len, true);
    }

    private void zeroCluster(long pos, boolean unmap) throws IOException {
        img.meta.lock();
        try {
            int l1i = geo.l1Index(pos);
            long l1e = img.l1[l1i];
            boolean zeroBelow = img.backing() == null;
            if ((l1e & L2Entry.L1_OFFSET_MASK) == 0) {
                if (zeroBelow) {
                    return; // unallocated without a backing file already reads as zeros
                }
            } else {
                long[] cur = img.l2Table(l1e & L2Entry.L1_OFFSET_MASK, l1i);
                int i = geo.l2Index(pos) * step();
                long ce = cur[i], cb = geo.extendedL2() ? cur[i + 1] : 0;
                boolean unallocated = ce == 0 && cb == 0;
                boolean zeroPlain = geo.extendedL2() ? ce == 0 && cb == 0xffff_ffffL << 32 : ce == L2Entry.ZERO;
                if ((unallocated && zeroBelow) || zeroPlain) {
                    return;
                }
            }
            L2Ref r = writableL2(l1i);
            int idx = geo.l2Index(pos);
            long e = entryAt(r, idx);
            boolean keep = !unmap && writableInPlace(e) && !header().hasDataFile() && dedup == null;
            long ne, nb = 0;
            if (header().version() == 2) {
                ne = 0;
                keep = false;
            } else if (geo.extendedL2()) {
                ne = keep ? e & ~L2Entry.ZERO : 0;
                nb = 0xffff_ffffL << 32;
            } else {
                ne = keep ? (e | L2Entry.ZERO) : L2Entry.ZERO;
            }
            if (header().hasDataFile() && header().version() == 3) {
                // External data file clusters keep their mapping; only the zero flag changes.
                ne = geo.extendedL2() ? e : (e | L2Entry.ZERO);
                keep = true;
            }
            if (!keep) {
                releaseFor(e, pos);
            }
            if (header().hasDataFile() && header().dataFileRaw()) {
                // The raw data file must show the zeros too.
                long n = Math.min(cs, img.size() - pos);
                if (!(dataFile instanceof FileBlockFile df && df.punchHole(pos, n))) {
                    dataFile.write(ByteBuffer.allocate((int) n), pos);
                }
            }
            setEntry(r, idx, ne, nb);
            maybeWriteBack();
        } finally {
            img.meta.unlock();
        }
    }

    /** Compressed data is packed byte after byte from here (0: start a new cluster); reset when frees apply. */
    private long compressedCursor;

    /**
     * Writes one whole guest cluster compressed (convert -c); the last cluster of an image may be short and is
     * zero-padded. Where compression saves less than a sector the cluster is written normally.
     */
    public void writeCompressed(ByteBuffer data, long pos) throws IOException {
        checkRange(pos, data.remaining());
        int len = data.remaining();
        if (geo.offsetInCluster(pos) != 0 || (len != cs && pos + len != img.size())) {
            throw new IOException(img.name() + ": compressed writes must cover one whole cluster (offset " + pos + ", "
                    + len + " bytes)");
        }
        if (header().hasDataFile()) {
            throw new IOException(img.name() + ": compression is not supported with an external data file");
        }
        byte[] raw = new byte[(int) cs];
        data.duplicate().get(raw, 0, len);
        byte[] comp = Compression.compress(header().compressionType(), raw);
        if (comp == null || comp.length > cs - 512) {
            write(data, pos);
            return;
        }
        img.ioGate.readLock().lock();
        try {
            img.meta.lock();
            try {
                L2Ref r = writableL2(geo.l1Index(pos));
                int idx = geo.l2Index(pos);
                long old = entryAt(r, idx);
                long cursor = compressedCursor;
                long host = allocateCompressedBytes(comp.length);
                try {
                    dataFile.write(ByteBuffer.wrap(comp), host);
                } catch (IOException | RuntimeException e) {
                    // Nothing points at the bytes yet (a full disk, say): their references go back, so that the
                    // failed write leaks nothing.
                    compressedCursor = cursor;
                    giveBackCompressedBytes(host, comp.length);
                    throw e;
                }
                releaseFor(old, pos);
                setEntry(r, idx, L2Entry.compressedEntry(host, comp.length, geo.clusterBits()), 0);
                maybeWriteBack();
            } finally {
                img.meta.unlock();
            }
        } finally {
            img.ioGate.readLock().unlock();
        }
        data.position(data.limit());
    }

    /**
     * Bytes for compressed data, packed after the previous compressed cluster when they fit in its host cluster
     * (that cluster then gains a reference), else in fresh clusters (one reference each).
     */
    private long allocateCompressedBytes(int len) throws IOException {
        long cur = compressedCursor;
        if (cur != 0 && cur % cs != 0) {
            long room = cs - cur % cs;
            if (len <= room) {
                rc.add(cur / cs, 1);
                compressedCursor = cur + len;
                return cur;
            }
            // Run on into the clusters right after it when they are free, as QEMU packs compressed data.
            int more = (int) ((len - room + cs - 1) / cs);
            if (rc.allocateAt(cur / cs + 1, more)) {
                rc.add(cur / cs, 1);
                compressedCursor = cur + len;
                return cur;
            }
        }
        int n = (int) ((len + cs - 1) / cs);
        long off = rc.allocate(n);
        compressedCursor = off + len;
        return off;
    }

    /**
     * Undoes {@link #allocateCompressedBytes} for bytes at {@code host}: bytes starting inside a cluster were packed
     * after other compressed data there (that cluster gave one more reference); the clusters after it, or all of
     * them when {@code host} starts a cluster, were taken fresh.
     */
    private void giveBackCompressedBytes(long host, int len) throws IOException {
        long first = host / cs, last = (host + len - 1) / cs;
        if (host % cs != 0) {
            rc.add(first++, -1);
        }
        if (last >= first) {
            rc.free(first * cs, (int) (last - first + 1));
        }
    }

    // ---- metadata write-back ---------------------------------------------------------------------------------

    private void maybeWriteBack() throws IOException {
        if (img.l2Cache.dirtyCount() > img.l2Cache.capacity() / 2) {
            writeBack(!lazy());
        }
    }

    private boolean writeBack() throws IOException {
        return writeBack(true);
    }

    /**
     * Steps (1) and (2) of the write ordering; the caller holds the metadata lock. With lazy refcounts and
     * {@code refcounts} false the refcount blocks stay in the cache (the dirty bit covers them).
     */
    private boolean writeBack(boolean refcounts) throws IOException {
        checkUsable();
        boolean l2 = img.l2Cache.dirtyCount() > 0;
        if (!rc.hasDirty() && !l2 && dirtyL1.isEmpty()) {
            return false;
        }
        if (refcounts) {
            rc.writeDirty(); // a failed write leaves the blocks dirty: written again next time
        }
        sync();
        Map<Long, long[]> tables = img.l2Cache.takeDirty();
        try {
            for (Map.Entry<Long, long[]> d : tables.entrySet()) {
                long[] t = d.getValue();
                byte[] raw = new byte[t.length * 8];
                for (int i = 0; i < t.length; i++) {
                    Be.put64(raw, i * 8, t[i]);
                }
                file.write(ByteBuffer.wrap(raw), d.getKey());
            }
        } catch (IOException e) {
            // A full disk or an I/O error: the tables stay dirty (and in the cache) for the next write-back. What
            // reached the file is a mix of old and new entries that all point at synced data and refcounts.
            for (long off : tables.keySet()) {
                img.l2Cache.markDirty(off);
            }
            throw e;
        }
        if (!dirtyL1.isEmpty()) {
            fsync(file); // L2 tables on disk before the L1 entries that point at them
            for (int i : dirtyL1) {
                byte[] ent = new byte[8];
                Be.put64(ent, 0, img.l1[i]);
                file.write(ByteBuffer.wrap(ent), img.l1Offset() + 8L * i);
            }
            dirtyL1.clear();
        }
        fsync(file);
        return true;
    }

    private void sync() throws IOException {
        if (dataFile != file) {
            fsync(dataFile);
        }
        fsync(file);
    }

    /**
     * Makes every completed write durable and applies deferred frees (step 3), giving freed space back to the
     * host file. Must not be called from inside a guest I/O.
     */
    public void flush() throws IOException {
        flush(FREES_WAIT_MS);
    }

    /**
     * How long a flush waits for reads in progress before it applies the frees (they need the I/O gate alone): a
     * read may be sending to a client that does not take its data, and everyone else would wait with the flush.
     * Past this the frees wait for a later flush; the flush itself is complete already.
     */
    private static final long FREES_WAIT_MS = 2000;

    /** {@link #flush()}; waits at most {@code freesWaitMs} for the gate before frees (negative: as long as it takes). */
    private void flush(long freesWaitMs) throws IOException {
        checkUsable();
        img.meta.lock();
        try {
            if (!writeBack()) {
                sync(); // in-place data writes only: nothing else synced them
            }
        } finally {
            img.meta.unlock();
        }
        if (!rc.hasDeferred()) {
            return;
        }
        if (freesWaitMs < 0) {
            img.ioGate.writeLock().lock();
        } else {
            try {
                if (!img.ioGate.writeLock().tryLock(freesWaitMs, java.util.concurrent.TimeUnit.MILLISECONDS)) {
                    return;
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                return;
            }
        }
        try {
            img.meta.lock();
            try {
                // Requests of other connections may have run since the write-back above (the locks were free): the
                // entries they removed must be on disk before the clusters they released are freed below.
                writeBack();
                compressedCursor = 0; // its cluster may be freed below and reused for other data
                List<Long> freed = rc.applyDeferred();
                rc.writeDirty(); // a failure leaves the lowered refcounts dirty: written at the next write-back
                fsync(file);
                giveBack(freed);
                if (!copiedFixes.isEmpty()) {
                    // Sharing ended: the one remaining active entry gets COPIED again (refcount is 1 on disk now).
                    for (long c : copiedFixes) {
                        if (rc.get(c) == 1) {
                            long remaining = -1;
                            for (long u : dedup.users(c)) {
                                if (setCopied(u, c, true)) {
                                    remaining = u;
                                }
                            }
                            dedup.unshared(c, remaining);
                        }
                    }
                    copiedFixes.clear();
                    writeBack();
                }
            } finally {
                img.meta.unlock();
            }
        } finally {
            img.ioGate.writeLock().unlock();
        }
    }

    /**
     * Punches holes for freed clusters and truncates free clusters off the end of the file. Only a hint to the
     * host: when it fails the clusters stay in the file, free (refcount 0 on disk), and nothing is lost.
     */
    private void giveBack(List<Long> freed) throws IOException {
        for (long c : freed) {
            img.l2Cache.remove(c * cs);
        }
        try {
            rc.giveBack(freed);
        } catch (IOException e) {
            // the space is not returned this time; the refcounts say it is free
        }
    }

    /** Refuses a data write that would land on the image's own metadata (a corrupt mapping). */
    private void guardData(long host, long len) throws IOException {
        if (dataFile != file) {
            return;
        }
        guardMetadata(host, len, "a data write");
    }

    /**
     * Refuses to write data into, or to drop a reference to, host clusters that hold the image's metadata: QEMU's
     * default ("cached") overlap checks (header, active and snapshot L1 tables, active L2 tables, refcount table and
     * blocks, snapshot table), at cluster granularity since no data cluster may share a cluster with metadata.
     * A hit marks the image corrupt and makes it unusable for writing.
     */
    private void guardMetadata(long host, long len, String what) throws IOException {
        long first = host / cs, last = (host + Math.max(len, 1) - 1) / cs;
        Header h = header();
        // Tables that are contiguous runs of clusters: one range test each.
        List<Object[]> tables = new ArrayList<>();
        tables.add(new Object[]{"image header", 0L, cs});
        tables.add(new Object[]{"active L1 table", img.l1Offset(), 8L * img.l1.length});
        tables.add(new Object[]{"refcount table", rc.tableOffset(), (long) rc.tableClusters() * cs});
        if (h.nbSnapshots() > 0) {
            tables.add(new Object[]{"snapshot table", h.snapshotsOffset(), cs});
        }
        for (org.qdedup.format.Snapshot s : img.snapshots()) {
            tables.add(new Object[]{"L1 table of snapshot '" + s.name() + "'", s.l1TableOffset(), 8L * s.l1Size()});
        }
        for (Object[] t : tables) {
            long off = (Long) t[1], bytes = (Long) t[2];
            if (bytes > 0 && first <= (off + bytes - 1) / cs && off / cs <= last) {
                refuse(what, host, len, (String) t[0], Math.max(first, off / cs));
            }
        }
        // Refcount blocks and L2 tables: one lookup per cluster.
        for (long c = first; c <= last; c++) {
            if (rc.isBlock(c)) {
                refuse(what, host, len, "refcount block", c);
            }
            if (isActiveL2(c)) {
                refuse(what, host, len, "active L2 table", c);
            }
        }
    }

    private void refuse(String what, long host, long len, String metadata, long cluster) throws IOException {
        markCorrupt();
        throw new IOException(img.name() + ": refusing " + what + " at host offset " + host + " (" + len
                + " bytes): it overlaps the " + metadata + " at host offset " + cluster * cs
                + "; the image is now marked corrupt");
    }

    /** Active L2 table clusters (built on first use, kept up to date by {@link #writableL2}). */
    private java.util.HashSet<Long> l2Clusters;

    private boolean isActiveL2(long c) {
        if (l2Clusters == null) {
            l2Clusters = new java.util.HashSet<>();
            for (long e : img.l1) {
                long off = e & L2Entry.L1_OFFSET_MASK;
                if (off != 0) {
                    l2Clusters.add(off / cs);
                }
            }
        }
        if (!l2Clusters.contains(c)) {
            return false;
        }
        for (long e : img.l1) {
            if ((e & L2Entry.L1_OFFSET_MASK) == c * cs) {
                return true;
            }
        }
        l2Clusters.remove(c); // stale
        return false;
    }

    private void markCorrupt() {
        try {
            Header h = header();
            if (h.version() == 3) {
                updateHeader(h.withIncompatible(h.incompatibleFeatures() | Features.INCOMPAT_CORRUPT));
            }
        } catch (IOException ignored) {
            // already failing: the caller reports the overlap
        }
        failed = new IOException("metadata overlap detected");
    }

    /** Flushes everything and, with lazy refcounts, marks the image clean again. */
    public void close() throws IOException {
        if (failed == null) {
            flush(-1);
            Header h = header();
            boolean persist = dedup != null && dedupLoaded && headerPrepared && h.version() == 3 && file.location() != null;
            if ((h.dirty() && headerPrepared) || persist) {
                img.meta.lock();
                try {
                    sync();
                    Header clean = h.withIncompatible(h.incompatibleFeatures() & ~Features.INCOMPAT_DIRTY);
                    if (persist) {
                        persistDedupIndex(clean);
                    } else {
                        updateHeader(clean);
                    }
                } finally {
                    img.meta.unlock();
                }
            }
        }
    }
}
