package org.qdedup.dedup;

import java.io.IOException;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashSet;
import java.util.Map;
import java.util.Set;

/**
 * Online dedup state of one open image: the index (content hash to host cluster and back), the first user of each
 * indexed cluster and, for clusters shared by dedup, the active guest clusters pointing at them, so COPIED can be
 * moved without scanning L2 tables. The writer calls it under its metadata lock; it reaches refcounts through
 * {@link RefcountPort} only.
 */
public final class Deduplicator {
    /** The narrow view of the refcount layer dedup needs. */
    public interface RefcountPort {
        long refcount(long cluster) throws IOException;

        long maxRefcount();
    }

    /** Compares a host cluster's current content with new data (to confirm a candidate). */
    public interface ClusterReader {
        /** Whether host cluster {@code cluster} holds exactly {@code data[off, off + len)}. */
        boolean holds(long cluster, byte[] data, int off, int len) throws IOException;
    }

    /** Counters for stats and metrics. */
    public static final class Counters {
        public long hits, misses, inplaceRewrites, backingEqual, zeroClusters, ceilingHits, fragmentCollisions, unalignedRmw;
    }

    private final DedupIndex index;
    private final RefcountPort refcounts;
    private final int headroom;
    private long[] owner = new long[0];
    private final Map<Long, Set<Long>> sharers = new HashMap<>();
    private final Counters counters = new Counters();
    private final long[] candidates = new long[16];

    /**
     * @param headroom snapshots that must still fit after sharing (1 by default)
     */
    public Deduplicator(RefcountPort refcounts, int expectedClusters, int headroom) {
        this.refcounts = refcounts;
        this.index = new DedupIndex(expectedClusters);
        this.headroom = headroom;
    }

    public Counters counters() {
        return counters;
    }

    public DedupIndex index() {
        return index;
    }

    /**
     * Whether one more reference to the cluster leaves room for {@code headroom} snapshots: a snapshot adds one
     * reference per entry, so k references need k * (1 + headroom) to fit the refcount width. With one snapshot
     * of headroom, 2-bit refcounts never share.
     */
    public boolean canShare(long cluster) throws IOException {
        return allows(refcounts.refcount(cluster) + 1);
    }

    /** Whether a cluster may have {@code references} references and still leave the snapshot headroom. */
    public boolean allows(long references) {
        long max = refcounts.maxRefcount();
        return max > 1 && references <= max / (1 + headroom);
    }

    /**
     * A host cluster holding exactly {@code data[off, off + len)} that may take one more reference, or -1. Every candidate is
     * confirmed by comparing its content: a hash fragment collision, or a cluster changed behind our back, is
     * never shared.
     */
    public long find(byte[] sha, byte[] data, int off, int len, ClusterReader reader) throws IOException {
        int n = index.candidates(sha, candidates);
        boolean ceiling = false;
        for (int i = 0; i < n; i++) {
            long c = candidates[i];
            if (!reader.holds(c, data, off, len)) {
                counters.fragmentCollisions++;
                continue;
            }
            if (canShare(c)) {
                return c;
            }
            ceiling = true;
        }
        if (ceiling) {
            counters.ceilingHits++;
        }
        return -1;
    }

    /** Whether the index says this host cluster holds this content (a candidate to confirm by reading). */
    public boolean indexedAs(long cluster, byte[] sha) {
        int n = index.candidates(sha, candidates);
        for (int i = 0; i < n; i++) {
            if (candidates[i] == cluster) {
                return true;
            }
        }
        return false;
    }

    /** A newly written cluster: indexed (only now, its data being written) with its first user. */
    public void stored(byte[] sha, long cluster, long guestCluster) {
        storedFragment(DedupIndex.fragment(sha), cluster, guestCluster);
    }

    /** {@link #stored} with the in-RAM key only (from the index file). */
    public void storedFragment(int fragment, long cluster, long guestCluster) {
        index.putFragment(fragment, cluster);
        ownedBy(cluster, guestCluster);
    }

    /** Records the first user of a host cluster (before its key is known, while the index is being built). */
    public void ownedBy(long cluster, long guestCluster) {
        if (cluster >= owner.length) {
            owner = Arrays.copyOf(owner, (int) Math.min(Integer.MAX_VALUE - 8, Math.max(cluster + 1, owner.length * 3L / 2 + 16)));
        }
        owner[(int) cluster] = guestCluster + 1;
    }

    /** The active guest cluster that first stored this host cluster, or -1. */
    public long owner(long cluster) {
        return cluster < owner.length ? owner[(int) cluster] - 1 : -1;
    }

    /** A guest cluster now points at a cluster it shares with its owner and maybe others. */
    public void shared(long cluster, long guestCluster) {
        Set<Long> s = sharers.computeIfAbsent(cluster, k -> new LinkedHashSet<>());
        long o = owner(cluster);
        if (o >= 0) {
            s.add(o);
        }
        s.add(guestCluster);
    }

    /** A guest cluster stopped pointing at a host cluster. */
    public void released(long cluster, long guestCluster) {
        Set<Long> s = sharers.get(cluster);
        if (s != null) {
            s.remove(guestCluster);
        }
        if (owner(cluster) == guestCluster) {
            owner[(int) cluster] = s != null && !s.isEmpty() ? s.iterator().next() + 1 : 0;
        }
    }

    /** The active guest clusters that may still point at a shared cluster (to be checked by the caller). */
    public Set<Long> users(long cluster) {
        Set<Long> s = sharers.get(cluster);
        if (s != null) {
            return s;
        }
        long o = owner(cluster);
        return o >= 0 ? Set.of(o) : Set.of();
    }

    /**
     * Sharing of a cluster ended (refcount 1): its sharer set goes and the one guest cluster still using it, if
     * known, becomes its owner, so that the next share finds that entry again and takes its COPIED away.
     */
    public void unshared(long cluster, long remainingUser) {
        sharers.remove(cluster);
        if (remainingUser >= 0) {
            ownedBy(cluster, remainingUser);
        } else if (cluster < owner.length) {
            owner[(int) cluster] = 0;
        }
    }

    /** The refcount layer freed a cluster: forget it, by physical cluster, without reading data back. */
    public void freed(long cluster) {
        index.removeCluster(cluster);
        sharers.remove(cluster);
        if (cluster < owner.length) {
            owner[(int) cluster] = 0;
        }
    }

    /** The cluster's content is about to change in place (refcount 1): its old hash must go. */
    public void rewritten(long cluster) {
        index.removeCluster(cluster);
    }
}
