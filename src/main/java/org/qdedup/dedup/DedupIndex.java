package org.qdedup.dedup;

import java.util.Arrays;

/**
 * The dedup index: content hash to host cluster and host cluster to entry, in about 15 bytes of RAM per indexed
 * cluster for both lookups together.
 *
 * <p>One open-addressing table of longs holds, per entry, a 32-bit fragment of the cluster's SHA-256 (which also
 * picks its home slot) and the 32-bit host cluster number; a dense int array maps host cluster numbers to slots.
 * A lookup by hash returns every cluster whose fragment matches: candidates only. The caller confirms each on the
 * full 256-bit hash of the candidate's current content before sharing it, so a fragment collision or a cluster
 * whose content changed behind our back is never shared. Not thread-safe: the caller serialises access.
 */
public final class DedupIndex {
    private static final long EMPTY = -1L;
    /** Host cluster numbers are stored in 32 bits; clusters beyond are simply not indexed. */
    public static final long MAX_CLUSTER = 0xffff_fffeL;

    /** Grow when this full; grow by this factor: RAM stays near 8 / 0.8 bytes per entry plus 4 for the cluster map. */
    private static final double MAX_LOAD = 0.9, GROWTH = 1.25;

    private long[] slots;
    private int size;
    /** slotOf[cluster] = slot index + 1, or 0 when the cluster is not indexed. */
    private int[] slotOf = new int[0];

    public DedupIndex(int expectedEntries) {
        slots = new long[(int) Math.max(16, Math.min(Integer.MAX_VALUE - 8, (long) (expectedEntries / 0.8)))];
        Arrays.fill(slots, EMPTY);
    }

    private int next(int i) {
        return i + 1 == slots.length ? 0 : i + 1;
    }

    /** The in-RAM key of a SHA-256: its first four bytes. */
    public static int fragment(byte[] sha256) {
        return ((sha256[0] & 0xff) << 24) | ((sha256[1] & 0xff) << 16) | ((sha256[2] & 0xff) << 8) | (sha256[3] & 0xff);
    }

    private static int fragOf(long slot) {
        return (int) (slot >>> 32);
    }

    private static long clusterOf(long slot) {
        return slot & 0xffff_ffffL;
    }

    private int home(int frag) {
        // SHA-256 bits are uniform already: map them onto the table by multiply-shift (any table size works).
        return (int) (((frag & 0xffff_ffffL) * slots.length) >>> 32);
    }

    public int size() {
        return size;
    }

    /**
     * Clusters whose hash shares the fragment of {@code sha256}, at most {@code out.length}; returns how many.
     * They are candidates: confirm each on the full hash of its content.
     */
    public int candidates(byte[] sha256, long[] out) {
        return candidatesOfFragment(fragment(sha256), out);
    }

    /** {@link #candidates} for an in-RAM key. */
    public int candidatesOfFragment(int frag, long[] out) {
        int n = 0;
        for (int i = home(frag); slots[i] != EMPTY; i = next(i)) {
            if (fragOf(slots[i]) == frag && n < out.length) {
                out[n++] = clusterOf(slots[i]);
            }
        }
        return n;
    }

    /** The in-RAM key recorded for an indexed host cluster. */
    public int fragmentOfCluster(long cluster) {
        if (!containsCluster(cluster)) {
            throw new IllegalArgumentException("cluster " + cluster + " is not indexed");
        }
        return fragOf(slots[slotOf[(int) cluster] - 1]);
    }

    public boolean containsCluster(long cluster) {
        return cluster < slotOf.length && slotOf[(int) cluster] != 0;
    }

    /** Records that {@code cluster} holds content with this hash (replacing what it held before). */
    public void put(byte[] sha256, long cluster) {
        putFragment(fragment(sha256), cluster);
    }

    /** {@link #put} with the in-RAM key already computed (from the index file). */
    public void putFragment(int fragment, long cluster) {
        if (cluster < 0 || cluster > MAX_CLUSTER) {
            return;
        }
        removeCluster(cluster);
        if (size + 1 > slots.length * MAX_LOAD) {
            grow();
        }
        insert(((long) fragment << 32) | cluster);
    }

    /** Makes room for {@code entries} entries at once (instead of growing step by step while loading). */
    public void ensureCapacity(int entries) {
        long want = slotsFor(entries);
        if (want <= slots.length || want > Integer.MAX_VALUE - 8) {
            return;
        }
        long[] old = slots;
        slots = new long[(int) want];
        Arrays.fill(slots, EMPTY);
        size = 0;
        for (long e : old) {
            if (e != EMPTY) {
                insert(e);
            }
        }
    }

    /** Receives index entries. */
    public interface EntryConsumer {
        void accept(int fragment, long cluster);
    }

    /** Every entry, in no particular order. */
    public void forEach(EntryConsumer c) {
        for (long s : slots) {
            if (s != EMPTY) {
                c.accept(fragOf(s), clusterOf(s));
            }
        }
    }

    /** Every entry, in ascending order of host cluster (the order the index file keeps), without sorting. */
    public void forEachByCluster(EntryConsumer c) {
        int[] map = slotOf;
        for (int cluster = 0; cluster < map.length; cluster++) {
            if (map[cluster] != 0) {
                c.accept(fragOf(slots[map[cluster] - 1]), cluster);
            }
        }
    }

    private void insert(long entry) {
        int i = home(fragOf(entry));
        while (slots[i] != EMPTY) {
            i = next(i);
        }
        slots[i] = entry;
        setSlot(clusterOf(entry), i);
        size++;
    }

    private void setSlot(long cluster, int slot) {
        if (cluster >= slotOf.length) {
            slotOf = Arrays.copyOf(slotOf, (int) Math.min(Integer.MAX_VALUE - 8, Math.max(cluster + 1, slotOf.length * 9L / 8 + 16)));
        }
        slotOf[(int) cluster] = slot + 1;
    }

    /** Forgets a host cluster (its refcount reached zero, or its content changed); true if it was indexed. */
    public boolean removeCluster(long cluster) {
        if (!containsCluster(cluster)) {
            return false;
        }
        int i = slotOf[(int) cluster] - 1;
        slotOf[(int) cluster] = 0;
        slots[i] = EMPTY;
        size--;
        // Backward-shift deletion keeps every probe chain unbroken without tombstones.
        int j = i;
        while (true) {
            j = next(j);
            if (slots[j] == EMPTY) {
                return true;
            }
            int h = home(fragOf(slots[j]));
            boolean movable = i <= j ? (h <= i || h > j) : (h <= i && h > j);
            if (movable) {
                slots[i] = slots[j];
                slotOf[(int) clusterOf(slots[i])] = i + 1;
                slots[j] = EMPTY;
                i = j;
            }
        }
    }

    private void grow() {
        long[] old = slots;
        slots = new long[(int) Math.min(Integer.MAX_VALUE - 8, (long) (old.length * GROWTH) + 1)];
        Arrays.fill(slots, EMPTY);
        size = 0;
        for (long e : old) {
            if (e != EMPTY) {
                insert(e);
            }
        }
    }

    private static long slotsFor(long entries) {
        return (long) (entries / 0.8) + 16;
    }

    /** RAM an index loaded with {@code entries} entries of host clusters up to {@code maxCluster} holds. */
    public static long memoryBytesFor(long entries, long maxCluster) {
        return 8 * slotsFor(entries) + 4 * (maxCluster + 1) + 64;
    }

    /** RAM the index holds (both arrays), for stats and the per-cluster goal. */
    public long memoryBytes() {
        return 8L * slots.length + 4L * slotOf.length + 64;
    }
}
