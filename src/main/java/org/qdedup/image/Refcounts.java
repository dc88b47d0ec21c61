package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.qdedup.format.Be;
import org.qdedup.format.FormatException;
import org.qdedup.format.Header;
import org.qdedup.io.BlockFile;

/**
 * Refcounts of host clusters: the refcount table and its blocks (any width 1..64 bits), a write-back block cache,
 * and cluster allocation.
 *
 * <p>Callers hold the image's metadata lock. Increments (and the table entries of new blocks) are written by
 * {@link #writeDirty()}, which the image calls (and syncs) before it writes any L2 entry that points at a newly
 * allocated cluster. Decrements are queued with
 * {@link #deferDecrement} and applied by {@link #applyDeferred()} only after the entries that referenced the
 * clusters are durably gone, so a freed cluster is never reused while a durable entry still points at it.
 */
public final class Refcounts {
    private final BlockFile file;
    private final String name;
    private final int clusterBits;
    private final long clusterSize;
    private final int order;
    private final long maxRefcount;
    private final long perBlock;
    private long[] table;
    private long tableOffset;
    private int tableClusters;
    private final LinkedHashMap<Long, byte[]> blocks = new LinkedHashMap<>(16, 0.75f, true);
    private final Map<Long, byte[]> dirty = new HashMap<>();
    private final List<Long> deferred = new ArrayList<>();
    /** Host clusters the refcount table names as refcount blocks (for the metadata overlap guard). */
    private final java.util.HashSet<Long> blockClusters = new java.util.HashSet<>();
    /** Lowest cluster that may be free: allocation scans from here. */
    private long freeHint;
    /** Called when the table moved, so the header can follow; set by the writer. */
    private TableMoved onTableMoved;
    private static final int CACHE_BLOCKS = 256;

    /** Receives the new table location after growth (the header must be rewritten and synced). */
    public interface TableMoved {
        void moved(long offset, int clusters) throws IOException;
    }

    Refcounts(BlockFile file, Header header) {
        this.file = file;
        this.name = file.name();
        this.clusterBits = header.clusterBits();
        this.clusterSize = header.clusterSize();
        this.order = header.refcountOrder();
        int bits = header.refcountBits();
        this.maxRefcount = bits == 64 ? Long.MAX_VALUE : (1L << bits) - 1;
        this.perBlock = clusterSize * 8 / bits;
        this.tableOffset = header.refcountTableOffset();
        this.tableClusters = header.refcountTableClusters();
    }

    /** Told of every refcount drop, by physical cluster (dedup forgets a cluster here when it reaches 0). */
    public interface DropListener {
        void dropped(long cluster, long refcount) throws IOException;
    }

    private DropListener listener;

    void onDrop(DropListener l) {
        this.listener = l;
    }

    /**
     * Checks clusters about to be handed out (or to hold a new refcount block) against the image's metadata: in a
     * damaged image a cluster in use can look free (its refcount block gone from the table, say). Set by the writer.
     */
    public interface AllocationGuard {
        void check(long cluster, long count) throws IOException;
    }

    private AllocationGuard guard;

    void onAllocate(AllocationGuard g) {
        this.guard = g;
    }

    private void guard(long cluster, long count) throws IOException {
        if (guard != null) {
            guard.check(cluster, count);
        }
    }

    void onTableMoved(TableMoved cb) {
        this.onTableMoved = cb;
    }

    /**
     * Told of a failure after which the cached refcounts can no longer be matched with the file: a failed fsync
     * (the kernel may have dropped the unsynced pages; a retry that succeeds proves nothing) or a refcount table
     * that moved in RAM but not on disk. The writer then refuses further writes.
     */
    private java.util.function.Consumer<IOException> onFatal = e -> { };

    void onFatal(java.util.function.Consumer<IOException> cb) {
        this.onFatal = cb;
    }

    private void sync() throws IOException {
        try {
            file.flush();
        } catch (IOException e) {
            onFatal.accept(e);
            throw e;
        }
    }

    public long maxRefcount() {
        return maxRefcount;
    }


    public long tableOffset() {
        return tableOffset;
    }

    public int tableClusters() {
        return tableClusters;
    }

    private void loadTable() throws IOException {
        if (table == null) {
            int n = (int) (tableClusters * clusterSize / 8);
            table = Images.readTable(file, tableOffset, n);
            blockClusters.clear();
            for (long e : table) {
                long off = e & 0x00ff_ffff_ffff_fe00L;
                if (off != 0) {
                    blockClusters.add(off >> clusterBits);
                }
            }
        }
    }

    /** Whether host cluster {@code cluster} is one of the refcount blocks the table names. */
    public boolean isBlock(long cluster) throws IOException {
        loadTable();
        return blockClusters.contains(cluster);
    }

    /** Refcount block offset for table index {@code ti}, validated, or 0. */
    private long blockOffset(long ti) throws IOException {
        loadTable();
        if (ti >= table.length) {
            return 0;
        }
        long e = table[(int) ti];
        long off = e & 0x00ff_ffff_ffff_fe00L;
        if ((e & 0x1ffL) != 0 || (e & 0xff00_0000_0000_0000L) != 0 || (off & (clusterSize - 1)) != 0) {
            throw FormatException.at(name, "refcount table entry " + ti, tableOffset + 8 * ti,
                    "a cluster-aligned refcount block offset", String.format("0x%016x", e));
        }
        return off;
    }

    /**
     * The block {@link #block} returned last, and whether it is in {@link #dirty}: one cluster's refcount is read
     * and set several times in a row, and each map lookup boxed its offset (under the metadata lock).
     */
    private long memoOff = -1;
    private byte[] memoBlock;
    private boolean memoDirty;

    private void forgetMemo() {
        memoOff = -1;
        memoBlock = null;
        memoDirty = false;
    }

    private byte[] block(long off) throws IOException {
        if (off == memoOff) {
            return memoBlock;
        }
        byte[] b = dirty.get(off);
        boolean isDirty = b != null;
        if (b == null) {
            b = blocks.get(off);
        }
        if (b == null) {
            if (off > file.size() - clusterSize) {
                throw FormatException.at(name, "refcount block", off, "a block inside the file (" + file.size() + " bytes)",
                        "offset " + off);
            }
            b = new byte[(int) clusterSize];
            file.readFully(ByteBuffer.wrap(b), off);
            blocks.put(off, b);
            if (blocks.size() > CACHE_BLOCKS) {
                var it = blocks.keySet().iterator();
                while (blocks.size() > CACHE_BLOCKS && it.hasNext()) {
                    Long k = it.next();
                    if (!dirty.containsKey(k)) {
                        it.remove();
                    }
                }
            }
        }
        memoOff = off;
        memoBlock = b;
        memoDirty = isDirty;
        return b;
    }

    /** The refcount of host cluster {@code cluster} (0 where no block covers it). */
    public long get(long cluster) throws IOException {
        long off = blockOffset(cluster / perBlock);
        if (off == 0) {
            return 0;
        }
        return entry(block(off), (int) (cluster % perBlock), order);
    }

    /**
     * How many clusters below {@code endCluster} have a refcount other than 0, counted block by block and no
     * further than {@code stopAt}: what {@link #get} of each would find, without a table lookup per cluster.
     */
    public long countInUse(long endCluster, long stopAt) throws IOException {
        long count = 0;
        for (long ti = 0; ti * perBlock < endCluster && count < stopAt; ti++) {
            long off = blockOffset(ti);
            if (off == 0) {
                continue;
            }
            byte[] b = block(off);
            int n = (int) Math.min(perBlock, endCluster - ti * perBlock);
            for (int i = 0; i < n && count < stopAt; i++) {
                if (entry(b, i, order) != 0) {
                    count++;
                }
            }
        }
        return count;
    }

    /** Sets a refcount in the cache (the block must exist); written by {@link #writeDirty}. */
    private void setExisting(long cluster, long value) throws IOException {
        long off = blockOffset(cluster / perBlock);
        byte[] b = block(off);
        putEntry(b, (int) (cluster % perBlock), order, value);
        if (!memoDirty) { // block(off) just made off the memo
            dirty.put(off, b);
            memoDirty = true;
        }
    }

    /** Adds {@code delta} to a cluster's refcount; creates the refcount block (and grows the table) if needed. */
    public void add(long cluster, long delta) throws IOException {
        long cur = get(cluster);
        long v = cur + delta;
        if (v < 0 || v > maxRefcount || (delta > 0 && v < cur)) {
            throw new RefcountOverflowException(name + ": refcount of host cluster " + cluster + " would be " + v
                    + ", outside 0.." + maxRefcount + " (refcount_bits " + (1 << order) + ")");
        }
        ensureBlock(cluster / perBlock);
        setExisting(cluster, v);
        if (v == 0 && cluster < freeHint) {
            freeHint = cluster;
        }
    }

    /** Queues a decrement to apply after the referencing entries are durably removed. */
    public void deferDecrement(long cluster) {
        deferred.add(cluster);
    }

    public boolean hasDeferred() {
        return !deferred.isEmpty();
    }

    /** Applies queued decrements (the caller has synced the entry removals); returns clusters that reached 0. */
    public List<Long> applyDeferred() throws IOException {
        List<Long> freed = new ArrayList<>();
        for (long c : deferred) {
            add(c, -1);
            long v = get(c);
            if (v == 0) {
                freed.add(c);
            }
            if (listener != null) {
                listener.dropped(c, v);
            }
        }
        deferred.clear();
        return freed;
    }

    public boolean hasDirty() {
        return !dirty.isEmpty();
    }

    /** Table indexes of blocks made since the last {@link #writeDirty}: their table entries are not written yet. */
    private final java.util.TreeSet<Long> pendingEntries = new java.util.TreeSet<>();

    /**
     * Writes dirty refcount blocks and then, after a sync, the table entries of new blocks; the caller syncs before
     * it writes anything that points at clusters these refcounts count. A failed write (a full disk) leaves the blocks
     * dirty and the entries pending, written again next time: nothing points into a new block's range before this
     * succeeds, and until then a crash leaves the new blocks unreferenced (free space).
     */
    public void writeDirty() throws IOException {
        memoDirty = false; // written blocks leave the dirty map (a failed write keeps some: a later put is harmless)
        for (var it = dirty.entrySet().iterator(); it.hasNext(); ) {
            Map.Entry<Long, byte[]> e = it.next();
            file.write(ByteBuffer.wrap(e.getValue()), e.getKey());
            it.remove();
        }
        if (pendingEntries.isEmpty()) {
            return;
        }
        sync();
        for (long ti : pendingEntries) {
            byte[] ent = new byte[8];
            Be.put64(ent, 0, table[(int) ti]);
            file.write(ByteBuffer.wrap(ent), tableOffset + 8 * ti);
        }
        pendingEntries.clear();
    }

    /** Makes sure the refcount block for table index {@code ti} exists, growing the table when needed. */
    private void ensureBlock(long ti) throws IOException {
        if (blockOffset(ti) != 0) {
            return;
        }
        if (ti >= table.length) {
            growTable(ti);
            if (blockOffset(ti) != 0) {
                return;
            }
        }
        // No block: every cluster in its range is free. Put the block inside its own range (self-describing),
        // away from the clusters being allocated; if they fill the range, put it just past them.
        long first = ti * perBlock;
        long b = -1;
        for (long c = first; c < first + perBlock; c++) {
            if (c < avoidStart || c >= avoidEnd) {
                b = c;
                break;
            }
        }
        byte[] blk = new byte[(int) clusterSize];
        boolean self = b >= 0;
        if (self) {
            putEntry(blk, (int) (b - first), order, 1);
        } else {
            b = avoidEnd;
        }
        guard(b, 1);
        long off = b << clusterBits;
        extendTo(off + clusterSize);
        forgetMemo();
        blocks.put(off, blk);
        dirty.put(off, blk);
        if (!self) {
            // The block lies in the next range; keep that range's own new block (if any) off it too.
            long savedEnd = avoidEnd;
            avoidEnd = b + 1;
            try {
                add(b, 1);
            } finally {
                avoidEnd = savedEnd;
            }
        }
        // The block reaches disk before the table entry that publishes it, and the entry before anything that points
        // into the block's range: both come with the next writeDirty, which every caller syncs before it writes such
        // a pointer (one pair of syncs for all the blocks made since, instead of one per block).
        table[(int) ti] = off;
        pendingEntries.add(ti);
        blockClusters.add(b);
    }

    /**
     * Moves the refcount table to the end of the file with room for index {@code need} and its own blocks. It
     * changes the table in RAM before the header points at the new one on disk: any failure on the way is fatal.
     */
    private void growTable(long need) throws IOException {
        try {
            moveTable(need);
        } catch (IOException e) {
            onFatal.accept(e);
            throw e;
        }
    }

    private void moveTable(long need) throws IOException {
        long start = (fileSize() + clusterSize - 1) >> clusterBits;
        long entries = Math.max(need + 1, table.length + table.length / 2 + 1);
        // Fixpoint: new blocks at [start, start+nb), table at [start+nb, start+nb+tc); all must be covered.
        long nb = 0, tc;
        for (;;) {
            tc = (entries * 8 + clusterSize - 1) / clusterSize;
            long last = start + nb + tc - 1;
            long lastIdx = last / perBlock;
            entries = Math.max(entries, lastIdx + 1);
            tc = (entries * 8 + clusterSize - 1) / clusterSize;
            long needed = 0;
            for (long ti = start / perBlock; ti <= (start + nb + tc - 1) / perBlock; ti++) {
                if (blockOffset0(ti) == 0) {
                    needed++;
                }
            }
            if (needed <= nb) {
                break;
            }
            nb = needed;
        }
        if (tc * clusterSize > Header.MAX_REFTABLE_BYTES) {
            throw new IOException(name + ": refcount table would exceed " + Header.MAX_REFTABLE_BYTES + " bytes");
        }
        long[] nt = new long[(int) (tc * clusterSize / 8)];
        System.arraycopy(table, 0, nt, 0, table.length);
        long next = start;
        long tableStart = start + nb;
        for (long ti = start / perBlock; ti <= (tableStart + tc - 1) / perBlock; ti++) {
            if (ti < nt.length && nt[(int) ti] == 0) {
                long off = next++ << clusterBits;
                nt[(int) ti] = off;
                blockClusters.add(off >> clusterBits);
                byte[] blk = new byte[(int) clusterSize];
                forgetMemo();
                blocks.put(off, blk);
                dirty.put(off, blk);
            }
        }
        long newTableOffset = tableStart << clusterBits;
        extendTo(newTableOffset + tc * clusterSize);
        long oldOffset = tableOffset;
        int oldClusters = tableClusters;
        table = nt;
        tableOffset = newTableOffset;
        tableClusters = (int) tc;
        for (long c = start; c < tableStart + tc; c++) {
            long off = blockOffset(c / perBlock);
            byte[] b = block(off);
            putEntry(b, (int) (c % perBlock), order, 1);
            dirty.put(off, b);
        }
        writeDirty();
        byte[] raw = new byte[(int) (tc * clusterSize)];
        for (int i = 0; i < nt.length; i++) {
            Be.put64(raw, i * 8, nt[i]);
        }
        file.write(ByteBuffer.wrap(raw), newTableOffset);
        sync();
        if (onTableMoved != null) {
            onTableMoved.moved(newTableOffset, tableClusters);
        }
        for (long c = oldOffset >> clusterBits; c < (oldOffset >> clusterBits) + oldClusters; c++) {
            deferDecrement(c);
        }
    }

    private long blockOffset0(long ti) {
        return ti < table.length ? table[(int) ti] & 0x00ff_ffff_ffff_fe00L : 0;
    }

    private void extendTo(long end) throws IOException {
        if (fileSize() < end) {
            file.truncate(end);
            knownSize = end;
        }
    }

    /**
     * A run allocated up to {@code end}: its caller writes all of it before anything reads it or points at it
     * durably, and that write grows the file (as in QEMU), so the file is not grown here: that would cost a system
     * call and a write of its own per allocation. Until then the file may be shorter than the size this allocator
     * works with; a crash leaves at most a refcount past the end of the file, a leak.
     */
    private void growsTo(long end) throws IOException {
        if (fileSize() < end) {
            knownSize = end;
        }
    }

    /**
     * The file's size as this allocator left it (allocated runs included, written or not): only it grows or shrinks
     * the file while the image is open.
     */
    private long knownSize = -1;

    private long fileSize() throws IOException {
        if (knownSize < 0) {
            knownSize = file.size();
        }
        return knownSize;
    }

    /** Clusters being allocated right now: refcount blocks created meanwhile must not land on them. */
    private long avoidStart, avoidEnd;

    /**
     * Allocates {@code n} contiguous free clusters, sets their refcounts to 1 (in the cache) and returns the first
     * host offset. The caller writes the run before anything reads it; that write grows the file where the run lies
     * past its end (see {@link #growsTo}).
     */
    public long allocate(int n) throws IOException {
        long endCluster = (fileSize() + clusterSize - 1) >> clusterBits;
        long c = freeHint;
        long run = 0, runStart = c;
        boolean usedUpToRun = true;
        while (run < n) {
            if (c >= endCluster) {
                if (run == 0) {
                    runStart = c;
                }
                break;
            }
            if (get(c) == 0) {
                if (run == 0) {
                    runStart = c;
                }
                run++;
            } else {
                if (run > 0) {
                    usedUpToRun = false;
                }
                run = 0;
            }
            c++;
        }
        long runEnd = runStart + n;
        guard(runStart, n);
        growsTo(runEnd << clusterBits);
        avoidStart = runStart;
        avoidEnd = runEnd;
        long k = runStart;
        try {
            for (; k < runEnd; k++) {
                add(k, 1);
            }
        } catch (IOException e) {
            free(runStart << clusterBits, (int) (k - runStart)); // a refcount block could not be created
            throw e;
        } finally {
            avoidStart = avoidEnd = 0;
        }
        if (usedUpToRun) {
            freeHint = Math.max(freeHint, runEnd);
        }
        return runStart << clusterBits;
    }

    /**
     * Undoes {@link #allocate} of {@code n} clusters at {@code offset} that nothing references (their data write
     * failed): the refcounts go back to 0 in the cache, as they still are on disk, so nothing leaks.
     */
    public void free(long offset, int n) throws IOException {
        for (long c = offset >> clusterBits; c < (offset >> clusterBits) + n; c++) {
            add(c, -1);
        }
    }

    /**
     * Allocates the {@code n} clusters starting at {@code cluster} if all of them are free (refcount 0 or past the
     * end of the file); returns false, changing nothing, otherwise.
     */
    public boolean allocateAt(long cluster, int n) throws IOException {
        long endCluster = (fileSize() + clusterSize - 1) >> clusterBits;
        for (long k = cluster; k < cluster + n && k < endCluster; k++) {
            if (get(k) != 0) {
                return false;
            }
        }
        guard(cluster, n);
        growsTo((cluster + n) << clusterBits);
        avoidStart = cluster;
        avoidEnd = cluster + n;
        try {
            for (long k = cluster; k < cluster + n; k++) {
                add(k, 1);
            }
        } finally {
            avoidStart = avoidEnd = 0;
        }
        if (freeHint >= cluster && freeHint < cluster + n) {
            freeHint = cluster + n;
        }
        return true;
    }

    /**
     * Gives space back to the host: truncates clusters with refcount 0 off the end of the file and punches holes
     * where {@code freed} clusters (refcount 0 now) lie inside it.
     */
    void giveBack(java.util.Collection<Long> freed) throws IOException {
        long end = (file.size() + clusterSize - 1) >> clusterBits;
        long newEnd = end;
        while (newEnd > 1 && get(newEnd - 1) == 0) {
            newEnd--;
        }
        if (newEnd < end) {
            file.truncate(newEnd << clusterBits);
            knownSize = -1;
        }
        {
            BlockFile f = file;
            // Only clusters still free now: one freed earlier may have been allocated again since.
            java.util.List<Long> free = new java.util.ArrayList<>();
            for (long c : freed) {
                if (c < newEnd && get(c) == 0) {
                    free.add(c);
                }
            }
            long[] sorted = free.stream().mapToLong(Long::longValue).sorted().distinct().toArray();
            int i = 0;
            while (i < sorted.length) {
                int j = i + 1;
                while (j < sorted.length && sorted[j] == sorted[j - 1] + 1) {
                    j++;
                }
                long start = sorted[i];
                long stop = Math.min(sorted[j - 1] + 1, newEnd);
                if (start < stop) {
                    f.punchHole(start << clusterBits, (stop - start) << clusterBits);
                }
                i = j;
            }
        }
    }


    /** Decodes entry {@code i} of a refcount block of 2^order-bit entries (sub-byte widths LSB first). */
    static long entry(byte[] block, int i, int order) {
        int bits = 1 << order;
        if (bits >= 8) {
            int bytes = bits / 8;
            long v = 0;
            for (int k = 0; k < bytes; k++) {
                v = (v << 8) | (block[i * bytes + k] & 0xff);
            }
            return v;
        }
        int perByte = 8 / bits;
        int b = block[i / perByte] & 0xff;
        int shift = (i % perByte) * bits;
        return (b >>> shift) & ((1 << bits) - 1);
    }

    static void putEntry(byte[] block, int i, int order, long v) {
        int bits = 1 << order;
        if (bits >= 8) {
            int bytes = bits / 8;
            for (int k = bytes - 1; k >= 0; k--) {
                block[i * bytes + k] = (byte) v;
                v >>>= 8;
            }
            return;
        }
        int perByte = 8 / bits;
        int shift = (i % perByte) * bits;
        int mask = ((1 << bits) - 1) << shift;
        int idx = i / perByte;
        block[idx] = (byte) ((block[idx] & ~mask) | (((int) v << shift) & mask));
    }

    /** Thrown when a refcount would leave its width's range. */
    public static final class RefcountOverflowException extends IOException {
        public RefcountOverflowException(String m) {
            super(m);
        }
    }
}
