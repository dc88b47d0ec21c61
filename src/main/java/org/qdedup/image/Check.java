package org.qdedup.image;

import java.io.IOException;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import org.qdedup.format.Be;
import org.qdedup.format.Features;
import org.qdedup.format.Header;
import org.qdedup.format.L2Entry;
import org.qdedup.format.Snapshot;
import org.qdedup.io.BlockFile;

/**
 * qemu-img check for qcow2, counted the way QEMU counts (qcow2_check_refcounts): references are recomputed from
 * the header, the active and snapshot L1/L2 tables, the snapshot table and the refcount structures, then compared
 * with the stored refcounts; COPIED flags are checked against the stored refcounts.
 *
 * <p>Repair: {@code LEAKS} lowers refcounts that are too high; {@code ALL} first mends what would stay broken
 * (reserved bits, COPIED on compressed clusters, references past the end of the file, bad snapshot entries),
 * rebuilds the whole refcount structure at the end of the file when any refcount is too low or a refcount block is
 * damaged, and fixes COPIED. Data clusters are never moved or rewritten.
 */
public final class Check {
    /** What to repair. */
    public enum Fix { NONE, LEAKS, ALL }

    /** The counts qemu-img check prints. */
    public static final class Result {
        public long corruptions, leaks, checkErrors, corruptionsFixed, leaksFixed, imageEndOffset;
        public long totalClusters, allocatedClusters, fragmentedClusters, compressedClusters;
    }

    private static final long L1E_RESERVED = 0x7f00_0000_0000_01ffL;
    private static final long L2E_STD_RESERVED = 0x3f00_0000_0000_01feL;
    private static final long REFT_OFFSET_MASK = 0xffff_ffff_ffff_fe00L;
    private static final long REFT_RESERVED = 0x1ffL;

    private final BlockFile file;
    private final PrintStream diag;
    private Header h;
    private long cs;
    private int bits;
    private boolean ext;
    private long maxRef;
    private long[] refs;
    private long nbClusters;
    private boolean rebuild;
    private Result res;
    private long[] reftable;
    /** Corruptions found before the COPIED pass (refcount-level problems). */
    private long refcountCorruptions;

    private Check(BlockFile file, PrintStream diag) {
        this.file = file;
        this.diag = diag;
    }

    /**
     * Checks (and with {@code fix}, repairs) the qcow2 image in {@code file}, which must be open read-write when
     * repairing. Messages about each problem go to {@code diag}, as qemu-img prints them to stderr.
     */
    public static Result run(BlockFile file, Fix fix, PrintStream diag) throws IOException {
        Check c = new Check(file, diag);
        if (fix == Fix.NONE) {
            return c.check(false);
        }
        Images.clearDedupIndexBit(file); // a repair changes what the dedup index file describes
        Result before = fix == Fix.ALL ? c.repairAll() : c.repairLeaks();
        boolean dirty = c.h.dirty() || c.h.corrupt();
        if (before.corruptions == 0 && before.leaks == 0 && before.checkErrors == 0 && !dirty) {
            return before;
        }
        // Double-check the repaired image, quietly, and report what the repair changed.
        Result after = new Check(file, new PrintStream(PrintStream.nullOutputStream())).check(false);
        if (fix == Fix.LEAKS) {
            // The same repairs as QEMU's -r leaks, so the same numbers.
            after.leaksFixed = c.leakFixes;
            after.corruptionsFixed = c.copiedFixes;
        } else {
            // -r all mends more than QEMU does and by other means (a rebuild rather than refcount by refcount):
            // the problems the first check found that the second no longer finds.
            after.corruptionsFixed = Math.max(0, before.corruptions - after.corruptions);
            after.leaksFixed = Math.max(0, before.leaks - after.leaks);
        }
        if (after.corruptions == 0 && after.checkErrors == 0) {
            new Check(file, diag).markClean();
        }
        return after;
    }

    private void load() throws IOException {
        h = Images.readHeader(file, true);
        cs = h.clusterSize();
        bits = h.clusterBits();
        ext = h.extendedL2();
        maxRef = h.refcountBits() == 64 ? Long.MAX_VALUE : (1L << h.refcountBits()) - 1;
        reftable = Images.readTable(file, h.refcountTableOffset(), (int) (h.refcountTableClusters() * cs / 8));
    }

    /** One pass of counting; {@code forRebuild} leaves the refcount table and blocks out and stops after counting. */
    private Result check(boolean forRebuild) throws IOException {
        load();
        res = new Result();
        rebuild = false;
        long fsize = file.size();
        nbClusters = (fsize + cs - 1) / cs;
        refs = new long[(int) Math.max(1, nbClusters)];
        res.totalClusters = (h.size() + cs - 1) / cs;
        inc(0, cs);
        checkL1(h.l1TableOffset(), h.l1Size(), true);
        List<Snapshot> snaps = Images.readSnapshots(file, h, true);
        if (h.hasDataFile() && !snaps.isEmpty()) {
            diag.printf("ERROR %d snapshots in image with data file%n", snaps.size());
            res.corruptions++;
        }
        for (Snapshot s : snaps) {
            if ((s.l1TableOffset() & (cs - 1)) != 0) {
                diag.printf("ERROR snapshot %s (%s) l1_offset=%#x: L1 table is not cluster aligned; snapshot table entry corrupted%n",
                        s.id(), s.name(), s.l1TableOffset());
                res.corruptions++;
                continue;
            }
            if ((long) s.l1Size() > Header.MAX_L1_BYTES / 8) {
                diag.printf("ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; snapshot table entry corrupted%n",
                        s.id(), s.name(), s.l1Size());
                res.corruptions++;
                continue;
            }
            checkL1(s.l1TableOffset(), s.l1Size(), false);
        }
        long snapBytes = 0;
        for (Snapshot s : snaps) {
            snapBytes += s.encodedLength();
        }
        inc(h.snapshotsOffset(), snapBytes);
        if (!forRebuild) {
            inc(h.refcountTableOffset(), (long) h.refcountTableClusters() * cs);
            checkRefblocks();
        }
        if (forRebuild) {
            return res;
        }
        long highest = compare(Fix.NONE);
        refcountCorruptions = res.corruptions;
        checkCopied(false);
        res.imageEndOffset = (highest + 1) * cs;
        return res;
    }

    private void grow(long k) {
        if (k >= refs.length) {
            refs = Arrays.copyOf(refs, (int) Math.max(k + 1, refs.length * 2L));
        }
        nbClusters = Math.max(nbClusters, k + 1);
    }

    /** qcow2_inc_refcounts_imrt. */
    private void inc(long offset, long size) throws IOException {
        if (size <= 0) {
            return;
        }
        long fileLen = file.size();
        if (offset + size - fileLen >= cs) {
            diag.printf("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                    + "offset %#x size %#x%n", offset, size);
            res.corruptions++;
            return;
        }
        for (long c = offset & -cs; c <= ((offset + size - 1) & -cs); c += cs) {
            long k = c >>> bits;
            grow(k);
            if (refs[(int) k] == maxRef) {
                diag.printf("ERROR: overflow cluster offset=%#x%n", c);
                res.corruptions++;
                continue;
            }
            refs[(int) k]++;
        }
    }


    private void checkL1(long l1Offset, int l1Size, boolean active) throws IOException {
        if (l1Size == 0) {
            return;
        }
        inc(l1Offset, l1Size * 8L);
        long[] l1 = Images.readTable(file, l1Offset, l1Size);
        for (long e : l1) {
            if (e == 0) {
                continue;
            }
            if ((e & L1E_RESERVED) != 0) {
                diag.printf("ERROR found L1 entry with reserved bits set: %x%n", e);
                res.corruptions++;
            }
            long l2 = e & L2Entry.L1_OFFSET_MASK;
            inc(l2, cs);
            if ((l2 & (cs - 1)) != 0) {
                diag.printf("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted%n", l2);
                res.corruptions++;
            }
            checkL2(l2, active);
        }
    }

    private void checkL2(long l2Offset, boolean active) throws IOException {
        int entries = (int) (cs / (ext ? 16 : 8));
        long[] t = Images.readTable(file, l2Offset, (int) (cs / 8));
        long nextContiguous = 0;
        for (int i = 0; i < entries; i++) {
            long e = t[ext ? 2 * i : i];
            long bitmap = ext ? t[2 * i + 1] : 0;
            boolean compressed = L2Entry.isCompressed(e);
            if (!compressed && (e & L2E_STD_RESERVED) != 0) {
                diag.printf("ERROR found l2 entry with reserved bits set: %x%n", e);
                res.corruptions++;
            }
            if (compressed) {
                if ((e & L2Entry.COPIED) != 0) {
                    diag.printf("ERROR: coffset=0x%x: copied flag must never be set for compressed clusters%n",
                            L2Entry.compressedOffset(e, bits));
                    e &= ~L2Entry.COPIED;
                    res.corruptions++;
                }
                if (h.hasDataFile()) {
                    diag.printf("ERROR compressed cluster %d with data file, entry=0x%x%n", i, e);
                    res.corruptions++;
                    continue;
                }
                if (bitmap != 0) {
                    diag.printf("ERROR compressed cluster %d with non-zero subcluster allocation bitmap, entry=0x%x%n", i, e);
                    res.corruptions++;
                    continue;
                }
                inc(L2Entry.compressedOffset(e, bits), L2Entry.compressedLength(e, bits));
                if (active) {
                    res.allocatedClusters++;
                    res.compressedClusters++;
                    res.fragmentedClusters++;
                }
                continue;
            }
            long off = e & L2Entry.OFFSET_MASK;
            boolean zeroFlag = !ext && (e & L2Entry.ZERO) != 0;
            boolean allocated = off != 0 || (h.hasDataFile() && (e & L2Entry.COPIED) != 0);
            if (!allocated) {
                if (ext && (bitmap & L2Entry.BITMAP_ALL_ALLOC) != 0) {
                    res.corruptions++;
                    diag.printf("ERROR: Unallocated cluster has non-zero subcluster allocation map%n");
                }
                continue;
            }
            if (((bitmap >>> 32) & bitmap) != 0) {
                res.corruptions++;
                diag.printf("ERROR offset=%x: Allocated cluster has corrupted subcluster allocation bitmap%n", off);
            }
            if ((off & (cs - 1)) != 0) {
                res.corruptions++;
                boolean data = ext ? (bitmap & L2Entry.BITMAP_ALL_ALLOC) != 0 : !zeroFlag;
                diag.printf(data ? "ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted.%n"
                        : "ERROR offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.%n", off);
            }
            if (active) {
                res.allocatedClusters++;
                if (nextContiguous != 0 && off != nextContiguous) {
                    res.fragmentedClusters++;
                }
                nextContiguous = off + cs;
            }
            if (!h.hasDataFile()) {
                inc(off, cs);
            }
        }
    }

    private final long[] cacheOff = {-1};
    private final byte[][] cacheBlock = new byte[1][];

    /** The refcount QEMU's qcow2_get_refcount reads, or -1 where it fails. */
    private long diskRefcount(long cluster) throws IOException {
        long per = cs * 8 / h.refcountBits();
        long ti = cluster / per;
        if (ti >= reftable.length) {
            return 0;
        }
        long off = reftable[(int) ti] & REFT_OFFSET_MASK;
        if (off == 0) {
            return 0;
        }
        if ((off & (cs - 1)) != 0) {
            return -1;
        }
        if (cacheOff[0] != off) {
            cacheBlock[0] = new byte[(int) cs];
            file.readFully(ByteBuffer.wrap(cacheBlock[0]), off);
            cacheOff[0] = off;
        }
        return Refcounts.entry(cacheBlock[0], (int) (cluster % per), h.refcountOrder());
    }

    private void checkRefblocks() throws IOException {
        for (int i = 0; i < reftable.length; i++) {
            long e = reftable[i];
            long off = e & REFT_OFFSET_MASK;
            long cluster = off >>> bits;
            if ((e & REFT_RESERVED) != 0) {
                diag.printf("ERROR refcount table entry %d has reserved bits set%n", i);
                res.corruptions++;
                rebuild = true;
                continue;
            }
            if ((off & (cs - 1)) != 0) {
                diag.printf("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted%n", i);
                res.corruptions++;
                rebuild = true;
                continue;
            }
            if (cluster >= nbClusters) {
                res.corruptions++;
                diag.printf("ERROR refcount block %d is outside image%n", i);
                rebuild = true;
                continue;
            }
            if (off != 0) {
                inc(off, cs);
                if (refs[(int) cluster] != 1) {
                    diag.printf("ERROR refcount block %d refcount=%d%n", i, refs[(int) cluster]);
                    res.corruptions++;
                    rebuild = true;
                }
            }
        }
    }

    /** compare_refcounts; with LEAKS fixes too-high refcounts in place. Returns the highest used cluster. */
    private long compare(Fix fix) throws IOException {
        long highest = 0;
        for (long i = 0; i < nbClusters; i++) {
            long r1 = diskRefcount(i);
            if (r1 < 0) {
                diag.printf("Can't get refcount for cluster %d: Input/output error%n", i);
                res.checkErrors++;
                continue;
            }
            long r2 = i < refs.length ? refs[(int) i] : 0;
            if (r1 > 0 || r2 > 0) {
                highest = i;
            }
            if (r1 != r2) {
                boolean fixable = r1 != 0 && r1 > r2 && fix != Fix.NONE;
                if (r1 == 0) {
                    rebuild = true;
                }
                diag.printf("%s cluster %d refcount=%d reference=%d%n", fixable ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked",
                        i, r1, r2);
                if (fixable) {
                    setDiskRefcount(i, r2);
                    res.leaksFixed++;
                    continue;
                }
                if (r1 < r2) {
                    res.corruptions++;
                } else {
                    res.leaks++;
                }
            }
        }
        return highest;
    }

    private void setDiskRefcount(long cluster, long value) throws IOException {
        long per = cs * 8 / h.refcountBits();
        long off = reftable[(int) (cluster / per)] & REFT_OFFSET_MASK;
        byte[] b = new byte[(int) cs];
        file.readFully(ByteBuffer.wrap(b), off);
        Refcounts.putEntry(b, (int) (cluster % per), h.refcountOrder(), value);
        file.write(ByteBuffer.wrap(b), off);
        cacheOff[0] = -1;
    }

    /** check_oflag_copied: COPIED must be set exactly when the stored refcount is 1 (active tables only). */
    private void checkCopied(boolean repair) throws IOException {
        long[] l1 = Images.readTable(file, h.l1TableOffset(), h.l1Size());
        int step = ext ? 2 : 1;
        for (int i = 0; i < l1.length; i++) {
            long l1e = l1[i];
            long l2 = l1e & L2Entry.L1_OFFSET_MASK;
            if (l2 == 0) {
                continue;
            }
            long rc = diskRefcount(l2 >>> bits);
            if (rc < 0) {
                continue;
            }
            if ((rc == 1) != ((l1e & L2Entry.COPIED) != 0)) {
                diag.printf("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d%n", repair ? "Repairing" : "ERROR",
                        i, l1e, rc);
                if (repair) {
                    long ne = rc == 1 ? l1e | L2Entry.COPIED : l1e & ~L2Entry.COPIED;
                    writeLong(h.l1TableOffset() + 8L * i, ne);
                    res.corruptionsFixed++;
                } else {
                    res.corruptions++;
                }
            }
            long[] t = Images.readTable(file, l2, (int) (cs / 8));
            boolean dirty = false;
            for (int j = 0; j < t.length / step; j++) {
                long e = t[j * step];
                if (L2Entry.isCompressed(e)) {
                    continue;
                }
                long off = e & L2Entry.OFFSET_MASK;
                boolean allocated = off != 0 || (h.hasDataFile() && (e & L2Entry.COPIED) != 0);
                if (!allocated) {
                    continue;
                }
                long r = h.hasDataFile() ? 1 : diskRefcount(off >>> bits);
                if (r < 0) {
                    continue;
                }
                if ((r == 1) != ((e & L2Entry.COPIED) != 0)) {
                    diag.printf("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d%n", repair ? "Repairing" : "ERROR", e, r);
                    if (repair) {
                        t[j * step] = r == 1 ? e | L2Entry.COPIED : e & ~L2Entry.COPIED;
                        dirty = true;
                        res.corruptionsFixed++;
                    } else {
                        res.corruptions++;
                    }
                }
            }
            if (dirty) {
                Images.writeTable(file, l2, t);
            }
        }
    }

    private void writeLong(long offset, long v) throws IOException {
        byte[] b = new byte[8];
        Be.put64(b, 0, v);
        file.write(ByteBuffer.wrap(b), offset);
    }


    // ---- repair ------------------------------------------------------------------------------------------------

    /**
     * -r leaks: lowers too-high refcounts in place; fixes COPIED only when nothing else is then wrong. As QEMU, a
     * refcount structure that would need rebuilding (a used cluster with refcount 0, a broken refcount block) makes
     * it fail with nothing changed: only -r all rebuilds.
     */
    /** What {@code -r leaks} changed, counted as QEMU counts it: refcounts lowered, COPIED flags corrected. */
    private long leakFixes, copiedFixes;

    private Result repairLeaks() throws IOException {
        Result before = check(false);
        if (rebuild) {
            diag.println("ERROR need to rebuild refcount structures");
            throw new IOException("Input/output error");
        }
        long leaksLeft = 0;
        if (before.leaks > 0) {
            res = new Result();
            compare(Fix.LEAKS);
            leaksLeft = res.leaks;
            leakFixes = res.leaksFixed;
        }
        if (refcountCorruptions == 0 && before.checkErrors == 0 && leaksLeft == 0) {
            res = new Result();
            checkCopied(true);
            copiedFixes = res.corruptionsFixed;
        }
        file.flush();
        return before;
    }

    /** -r all: mend structure, rebuild or fix refcounts, then fix COPIED. */
    private Result repairAll() throws IOException {
        Result before = check(false);
        boolean flagged = h.dirty() || h.corrupt();
        if (before.corruptions == 0 && before.leaks == 0 && before.checkErrors == 0 && !flagged) {
            return before;
        }
        mendStructure();
        check(false);
        if (rebuild || res.corruptions > 0) {
            check(true);
            rebuildRefcounts();
        } else if (res.leaks > 0) {
            res = new Result();
            compare(Fix.LEAKS);
        }
        file.flush();
        load();
        res = new Result();
        checkCopied(true);
        file.flush();
        return before;
    }

    /**
     * Mends what a refcount rebuild cannot: reserved bits in L1/L2 entries, COPIED on compressed clusters, snapshot
     * entries whose L1 table is unusable, and references past the end of the file (the file is extended, so those
     * clusters read as the zeros QEMU read before). Returns the number of problems mended.
     */
    private long mendStructure() throws IOException {
        load();
        long mended = 0;
        mendNeed = file.size();
        mended += mendL1(h.l1TableOffset(), h.l1Size());
        for (Snapshot s : Images.readSnapshots(file, h, true)) {
            if ((s.l1TableOffset() & (cs - 1)) == 0 && (long) s.l1Size() <= Header.MAX_L1_BYTES / 8) {
                mended += mendL1(s.l1TableOffset(), s.l1Size());
            }
        }
        if (mendNeed > file.size()) {
            file.truncate((mendNeed + cs - 1) & -cs);
            mended++;
        }
        List<Snapshot> snaps = Images.readSnapshots(file, h, true);
        List<Snapshot> keep = new ArrayList<>();
        for (Snapshot s : snaps) {
            if ((s.l1TableOffset() & (cs - 1)) != 0 || (long) s.l1Size() > Header.MAX_L1_BYTES / 8) {
                diag.printf("Deleting invalid snapshot %s (%s)%n", s.id(), s.name());
                mended++;
            } else {
                keep.add(s);
            }
        }
        if (keep.size() != snaps.size()) {
            int len = 0;
            for (Snapshot s : keep) {
                len += s.encodedLength();
            }
            byte[] tbl = new byte[len];
            int p = 0;
            for (Snapshot s : keep) {
                s.encode(tbl, p);
                p += s.encodedLength();
            }
            if (len > 0) {
                file.write(ByteBuffer.wrap(tbl), h.snapshotsOffset());
            }
            writeHeader(h.withSnapshots(keep.size(), keep.isEmpty() ? 0 : h.snapshotsOffset()));
        }
        file.flush();
        return mended;
    }

    /** The file length that every reference seen by {@link #mendL1} needs. */
    private long mendNeed;

    /**
     * Mends one L1 table (active or a snapshot's) and its L2 tables: reserved bits cleared, COPIED dropped from
     * compressed entries, preallocated zero clusters at unaligned offsets made plain zero clusters (as QEMU's
     * fix_l2_entry_by_zero). Tables at unaligned offsets are left alone: what lies there is not a table.
     */
    private long mendL1(long l1Offset, int l1Size) throws IOException {
        if (l1Size == 0) {
            return 0;
        }
        long mended = 0;
        long[] l1 = Images.readTable(file, l1Offset, l1Size);
        boolean l1Dirty = false;
        int step = ext ? 2 : 1;
        for (int i = 0; i < l1.length; i++) {
            if (l1[i] == 0) {
                continue;
            }
            if ((l1[i] & L1E_RESERVED) != 0) {
                l1[i] &= ~L1E_RESERVED;
                l1Dirty = true;
                mended++;
            }
            long l2 = l1[i] & L2Entry.L1_OFFSET_MASK;
            if ((l2 & (cs - 1)) != 0) {
                continue;
            }
            mendNeed = Math.max(mendNeed, l2 + cs);
            long[] t = Images.readTable(file, l2, (int) (cs / 8));
            boolean dirty = false;
            for (int j = 0; j < t.length / step; j++) {
                long e = t[j * step];
                if (L2Entry.isCompressed(e)) {
                    if ((e & L2Entry.COPIED) != 0) {
                        t[j * step] = e & ~L2Entry.COPIED;
                        dirty = true;
                        mended++;
                    }
                    long co = L2Entry.compressedOffset(e, bits);
                    mendNeed = Math.max(mendNeed, co + L2Entry.compressedLength(e, bits));
                    continue;
                }
                if ((e & L2E_STD_RESERVED) != 0) {
                    e &= ~L2E_STD_RESERVED;
                    t[j * step] = e;
                    dirty = true;
                    mended++;
                }
                long off = e & L2Entry.OFFSET_MASK;
                if (off != 0 && (off & (cs - 1)) != 0) {
                    long bitmap = ext ? t[j * step + 1] : 0;
                    boolean data = ext ? (bitmap & L2Entry.BITMAP_ALL_ALLOC) != 0 : (e & L2Entry.ZERO) == 0;
                    if (!data) {
                        diag.printf("Repairing offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.%n",
                                off);
                        if (ext) {
                            t[j * step] = 0;
                            t[j * step + 1] = bitmap & ~L2Entry.BITMAP_ALL_ALLOC;
                        } else {
                            t[j * step] = L2Entry.ZERO;
                        }
                        dirty = true;
                        mended++;
                        continue;
                    }
                }
                if (off != 0 && !h.hasDataFile()) {
                    mendNeed = Math.max(mendNeed, off + cs);
                }
            }
            if (dirty) {
                Images.writeTable(file, l2, t);
            }
        }
        if (l1Dirty) {
            Images.writeTable(file, l1Offset, l1);
        }
        return mended;
    }

    /**
     * rebuild_refcount_structure: a new refcount table and blocks at the end of the file, holding the recomputed
     * references (the old structure is not counted, so its clusters become free).
     */
    private void rebuildRefcounts() throws IOException {
        long per = cs * 8 / h.refcountBits();
        long start = (file.size() + cs - 1) / cs;
        long nb = 0, tc = 1;
        for (;;) {
            long total = start + nb + tc;
            long nnb = (total + per - 1) / per;
            long ntc = Math.max(1, (nnb * 8 + cs - 1) / cs);
            if (nnb == nb && ntc == tc) {
                break;
            }
            nb = nnb;
            tc = ntc;
        }
        long total = start + nb + tc;
        grow(total - 1);
        for (long c = start; c < total; c++) {
            refs[(int) c] = 1;
        }
        for (long c = 0; c < total; c++) {
            if (refs[(int) c] > maxRef) {
                throw new IOException(file.name() + ": cluster " + c + " has " + refs[(int) c]
                        + " references, more than refcount_bits allows");
            }
        }
        byte[] blocks = new byte[(int) (nb * cs)];
        for (long c = 0; c < total; c++) {
            if (refs[(int) c] != 0) {
                Refcounts.putEntry(blocks, (int) c, h.refcountOrder(), refs[(int) c]);
            }
        }
        long blocksOff = start * cs;
        long tableOff = (start + nb) * cs;
        long[] table = new long[(int) (tc * cs / 8)];
        for (int i = 0; i < nb; i++) {
            table[i] = blocksOff + i * cs;
        }
        file.truncate(total * cs);
        file.write(ByteBuffer.wrap(blocks), blocksOff);
        Images.writeTable(file, tableOff, table);
        file.flush();
        writeHeader(h.withRefcountTable(tableOff, (int) tc));
        file.flush();
        diag.println("Rebuilding refcount structure");
    }

    private void writeHeader(Header nh) throws IOException {
        Images.writeHeader(file, nh);
        h = nh;
    }

    /** qcow2_mark_clean and qcow2_mark_consistent: drop the dirty and corrupt bits. */
    private void markClean() throws IOException {
        load();
        long bitsNow = h.incompatibleFeatures() & ~(Features.INCOMPAT_DIRTY | Features.INCOMPAT_CORRUPT);
        if (bitsNow != h.incompatibleFeatures()) {
            file.flush();
            writeHeader(h.withIncompatible(bitsNow));
            file.flush();
        }
    }
}
