package org.qdedup.image;

import java.io.Closeable;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.qdedup.format.Be;
import org.qdedup.format.FormatException;
import org.qdedup.format.Geometry;
import org.qdedup.format.Header;
import org.qdedup.format.L2Entry;
import org.qdedup.format.Snapshot;
import org.qdedup.io.BlockFile;
import org.qdedup.io.FileBlockFile;

/**
 * Whole-image metadata edits on a qcow2 file nobody else has open (snapshots, resize, emptying): table I/O,
 * refcount changes over whole L1 trees, COPIED recomputation and giving freed space back.
 *
 * <p>Ordering, as in the writer: refcount increases are written and synced before anything points at the clusters;
 * references are removed (and synced) before refcounts drop. A crash leaks clusters at worst.
 */
final class ImageEditor implements Closeable {
    final BlockFile file;
    Header h;
    final Refcounts rc;
    final long cs;
    final int bits;
    final Geometry geo;
    List<Snapshot> snapshots;
    private final List<Long> freed = new ArrayList<>();

    private ImageEditor(BlockFile raw) throws IOException {
        this.file = clearingIndexBitFirst(raw);
        this.h = Images.readHeader(file);
        if (h.dirty() || h.corrupt()) {
            throw FormatException.of(file.name(), "image needs repair first (dirty or corrupt bit set): run 'qdedup check -r all'");
        }
        this.cs = h.clusterSize();
        this.bits = h.clusterBits();
        this.geo = new Geometry(bits, h.extendedL2());
        this.rc = new Refcounts(file, h);
        rc.onTableMoved((off, clusters) -> writeHeader(h.withRefcountTable(off, clusters)));
        this.snapshots = new ArrayList<>(Images.readSnapshots(file, h));
    }

    private static final long INDEX_BIT = org.qdedup.format.Features.AUTOCLEAR_DEDUP_INDEX;

    /**
     * Any edit makes the dedup index file stale, so the header says so before the first change reaches the file;
     * an edit refused before writing anything leaves the image as it was.
     */
    private static BlockFile clearingIndexBitFirst(BlockFile inner) throws IOException {
        Header h0 = Images.readHeader(inner);
        if ((h0.autoclearFeatures() & INDEX_BIT) == 0) {
            return inner;
        }
        return new org.qdedup.io.ForwardingBlockFile(inner) {
            private boolean cleared;

            private void clear() throws IOException {
                if (!cleared) {
                    cleared = true;
                    Images.clearDedupIndexBit(inner);
                }
            }

            @Override
            public void write(java.nio.ByteBuffer src, long pos) throws IOException {
                clear();
                inner.write(src, pos);
            }

            @Override
            public void truncate(long size) throws IOException {
                clear();
                inner.truncate(size);
            }

            @Override
            public boolean punchHole(long offset, long length) throws IOException {
                clear();
                return inner.punchHole(offset, length);
            }
        };
    }

    /** Opens an image file for editing with the exclusive (QEMU-compatible) lock. */
    static ImageEditor open(String name) throws IOException {
        FileBlockFile f = FileBlockFile.open(name, Path.of(name), true, FileBlockFile.Lock.EXCLUSIVE);
        try {
            return new ImageEditor(f);
        } catch (IOException | RuntimeException e) {
            f.close();
            throw e;
        }
    }

    static ImageEditor on(BlockFile f) throws IOException {
        return new ImageEditor(f);
    }

    long[] readTable(long offset, int count) throws IOException {
        return Images.readTable(file, offset, count);
    }

    void writeTable(long offset, long[] t) throws IOException {
        Images.writeTable(file, offset, t);
    }

    void writeHeader(Header nh) throws IOException {
        nh = nh.withAutoclear(nh.autoclearFeatures() & ~INDEX_BIT); // headers derived from the one read at open
        Images.writeHeader(file, nh);
        file.flush();
        h = nh;
    }

    long[] activeL1() throws IOException {
        return readTable(h.l1TableOffset(), h.l1Size());
    }

    int step() {
        return h.extendedL2() ? 2 : 1;
    }

    /** Host clusters an L2 entry holds a reference to (none, one, or several for compressed data). */
    void clustersOf(long entry, List<Long> out) {
        if (entry == 0) {
            return;
        }
        if (L2Entry.isCompressed(entry)) {
            long off = L2Entry.compressedOffset(entry, bits);
            int len = L2Entry.compressedLength(entry, bits);
            for (long c = off / cs; c <= (off + len - 1) / cs; c++) {
                out.add(c);
            }
            return;
        }
        long off = L2Entry.hostOffset(entry);
        if (off != 0 && !h.hasDataFile()) {
            out.add(off / cs);
        }
    }

    /** Every cluster reference of an L1 tree: its L2 tables and, through each, its data clusters. */
    List<Long> referencesOf(long[] l1) throws IOException {
        List<Long> out = new ArrayList<>();
        for (long e : l1) {
            long l2 = e & L2Entry.L1_OFFSET_MASK;
            if (l2 == 0) {
                continue;
            }
            out.add(l2 / cs);
            long[] t = readTable(l2, (int) (cs / 8));
            for (int j = 0; j < t.length; j += step()) {
                clustersOf(t[j], out);
            }
        }
        return out;
    }

    /** Refuses (before changing anything) when adding one reference to each cluster would overflow a refcount. */
    void checkCanAdd(List<Long> clusters, String what) throws IOException {
        java.util.HashMap<Long, Long> adds = new java.util.HashMap<>();
        for (long c : clusters) {
            adds.merge(c, 1L, Long::sum);
        }
        for (var e : adds.entrySet()) {
            if (rc.get(e.getKey()) + e.getValue() > rc.maxRefcount()) {
                throw new Refcounts.RefcountOverflowException(file.name() + ": cannot " + what + ": cluster "
                        + e.getKey() + " would need refcount " + (rc.get(e.getKey()) + e.getValue()) + ", but refcount_bits="
                        + h.refcountBits() + " allows at most " + rc.maxRefcount());
            }
        }
    }

    void addAll(List<Long> clusters) throws IOException {
        for (long c : clusters) {
            rc.add(c, 1);
        }
    }

    void dropAll(List<Long> clusters) throws IOException {
        for (long c : clusters) {
            rc.add(c, -1);
            if (rc.get(c) == 0) {
                freed.add(c);
            }
        }
    }

    /** Writes refcount changes and syncs. */
    void syncRefcounts() throws IOException {
        rc.writeDirty();
        file.flush();
    }

    /** Allocates zeroed clusters for a table of {@code bytes} and returns its offset (refcounts written). */
    long allocateTable(long bytes) throws IOException {
        int n = (int) Math.max(1, (bytes + cs - 1) / cs);
        long off = rc.allocate(n);
        syncRefcounts();
        file.write(ByteBuffer.wrap(new byte[(int) (n * cs)]), off);
        return off;
    }

    void freeTable(long offset, long bytes) throws IOException {
        if (offset == 0 || bytes == 0) {
            return;
        }
        List<Long> cl = new ArrayList<>();
        for (long c = offset / cs; c <= (offset + bytes - 1) / cs; c++) {
            cl.add(c);
        }
        dropAll(cl);
    }

    /** COPIED in the active L1 and L2 tables set exactly where the refcount is 1. */
    void fixCopied() throws IOException {
        long[] l1 = activeL1();
        boolean l1Dirty = false;
        for (int i = 0; i < l1.length; i++) {
            long l2 = l1[i] & L2Entry.L1_OFFSET_MASK;
            if (l2 == 0) {
                continue;
            }
            long want = rc.get(l2 / cs) == 1 ? l1[i] | L2Entry.COPIED : l1[i] & ~L2Entry.COPIED;
            if (want != l1[i]) {
                l1[i] = want;
                l1Dirty = true;
            }
            long[] t = readTable(l2, (int) (cs / 8));
            boolean dirty = false;
            for (int j = 0; j < t.length; j += step()) {
                long e = t[j];
                if (L2Entry.isCompressed(e)) {
                    continue;
                }
                long off = L2Entry.hostOffset(e);
                boolean owned = off != 0 || (h.hasDataFile() && (e & L2Entry.COPIED) != 0);
                if (!owned) {
                    continue;
                }
                long r = h.hasDataFile() ? 1 : rc.get(off / cs);
                long ne = r == 1 ? e | L2Entry.COPIED : e & ~L2Entry.COPIED;
                if (ne != e) {
                    t[j] = ne;
                    dirty = true;
                }
            }
            if (dirty) {
                writeTable(l2, t);
            }
        }
        if (l1Dirty) {
            writeTable(h.l1TableOffset(), l1);
        }
        file.flush();
    }

    /** Writes a new snapshot table in fresh clusters, points the header at it, then frees the old one. */
    void writeSnapshotTable(List<Snapshot> snaps) throws IOException {
        int len = 0;
        for (Snapshot s : snaps) {
            len += s.encodedLength();
        }
        long oldOff = h.snapshotsOffset();
        long oldLen = 0;
        for (Snapshot s : snapshots) {
            oldLen += s.encodedLength();
        }
        long off = 0;
        if (!snaps.isEmpty()) {
            byte[] tbl = new byte[len];
            int p = 0;
            for (Snapshot s : snaps) {
                s.encode(tbl, p);
                p += s.encodedLength();
            }
            off = allocateTable(len);
            file.write(ByteBuffer.wrap(tbl), off);
            file.flush();
        }
        writeHeader(h.withSnapshots(snaps.size(), off));
        if (oldOff != 0 && !snapshots.isEmpty()) {
            freeTable(oldOff, oldLen);
        }
        snapshots = new ArrayList<>(snaps);
    }

    /** Truncates free clusters off the end and punches holes where freed clusters were. */
    void giveBack() throws IOException {
        syncRefcounts();
        rc.giveBack(freed);
        freed.clear();
        file.flush();
    }

    @Override
    public void close() throws IOException {
        file.close();
    }
}
