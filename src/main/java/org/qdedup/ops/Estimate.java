package org.qdedup.ops;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import org.qdedup.dedup.Deduplicator;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ChainStatus;
import org.qdedup.io.Buffers;

/**
 * What dedup would save on a disk's content at several cluster sizes, writing nothing (like ZFS's zdb -S): every
 * cluster is read once, all-zero clusters are counted apart, the others are counted by SHA-256 content.
 */
public final class Estimate {
    /**
     * @param storedClusters clusters {@code convert --dedup} would store: one per distinct content, more for
     *                       contents used more often than one cluster's refcount may count (the ceiling)
     */
    public record Result(long clusterSize, long dataClusters, long distinctClusters, long zeroClusters, long storedClusters) {
        public long savedBytes() {
            return (dataClusters - storedClusters) * clusterSize;
        }

        public double dedupRatio() {
            return storedClusters == 0 ? 1.0 : (double) dataClusters / storedClusters;
        }
    }

    private Estimate() {
    }

    /**
     * @param referencesPerCluster how many guest clusters one stored cluster may serve (the dedup ceiling of the
     *                             image convert would make: 32767 for 16-bit refcounts with one snapshot of room)
     */
    public static List<Result> run(BlockDevice src, long[] clusterSizes, long referencesPerCluster, Progress progress)
            throws IOException {
        long size = src.size();
        int chunk = 2 << 20;
        for (long cs : clusterSizes) {
            if (cs < 512 || cs > chunk || Long.bitCount(cs) != 1) {
                throw new IllegalArgumentException("cluster size " + cs + " is not a power of two from 512 to 2 MiB");
            }
        }
        int n = clusterSizes.length;
        ContentCounts[] counts = new ContentCounts[n];
        long[] zeros = new long[n];
        for (int k = 0; k < n; k++) {
            counts[k] = new ContentCounts();
        }
        int threads = Math.max(2, Runtime.getRuntime().availableProcessors());
        ParallelChunks.run(size, chunk, threads, "estimate", () -> new ParallelChunks.Worker() {
            final ByteBuffer buf = Buffers.direct(chunk);
            final byte[] arr = new byte[chunk];
            final long[] myZeros = new long[n];
            long[] hs = new long[0];

            @Override
            public void chunk(long start, long end) throws IOException {
                int len = (int) (end - start);
                fill(src, buf, start, len);
                buf.get(0, arr, 0, len);
                java.util.Arrays.fill(arr, len, arr.length, (byte) 0);
                for (int k = 0; k < n; k++) {
                    int cs = (int) clusterSizes[k];
                    int clusters = (len + cs - 1) / cs;
                    if (hs.length < 2 * clusters) {
                        hs = new long[2 * clusters];
                    }
                    int m = 0;
                    for (int c = 0; c < clusters; c++) {
                        if (java.util.Arrays.mismatch(arr, c * cs, c * cs + cs, ZERO_ARRAY, 0, cs) < 0) {
                            myZeros[k]++;
                            continue;
                        }
                        ByteBuffer sha = ByteBuffer.wrap(org.qdedup.dedup.Sha256.of(arr, c * cs, cs));
                        hs[m++] = sha.getLong(0);
                        hs[m++] = sha.getLong(8);
                    }
                    synchronized (counts[k]) {
                        for (int i = 0; i < m; i += 2) {
                            counts[k].add(hs[i], hs[i + 1]);
                        }
                    }
                }
                progress.add(len);
            }

            @Override
            public void done() {
                synchronized (zeros) {
                    for (int k = 0; k < n; k++) {
                        zeros[k] += myZeros[k];
                    }
                }
            }
        });
        List<Result> out = new ArrayList<>();
        for (int k = 0; k < n; k++) {
            ContentCounts c = counts[k];
            out.add(new Result(clusterSizes[k], c.total, c.distinct, zeros[k], c.stored(referencesPerCluster)));
        }
        return out;
    }

    private static final byte[] ZERO_ARRAY = new byte[2 << 20];

    /** Reads {@code len} bytes at {@code start}, leaving zeros where the device reports holes or zeros. */
    private static void fill(BlockDevice src, ByteBuffer buf, long start, int len) throws IOException {
        long pos = start;
        long end = start + len;
        while (pos < end) {
            ChainStatus.Entry e = ChainStatus.entry(src, pos, end - pos);
            long l = e.length();
            if (l <= 0) {
                throw new IOException(src.name() + ": block status made no progress at offset " + pos);
            }
            ByteBuffer part = buf.slice((int) (pos - start), (int) l);
            if (e.zero()) {
                while (part.hasRemaining()) {
                    part.put(ZERO_ARRAY, 0, Math.min(part.remaining(), ZERO_ARRAY.length));
                }
            } else {
                src.read(part, pos);
            }
            pos += l;
        }
    }

    /** Occurrences of each content, keyed by the first 128 bits of its SHA-256, in an open-addressing table. */
    private static final class ContentCounts {
        long[] hi = new long[1 << 12], lo = new long[1 << 12];
        int[] count = new int[1 << 12];
        long distinct, total;

        void add(long h, long l) {
            total++;
            if ((distinct + 1) * 10 > hi.length * 7L) {
                grow();
            }
            int i = slot(h, l, hi, lo, count);
            if (count[i] == 0) {
                hi[i] = h;
                lo[i] = l;
                distinct++;
            }
            count[i]++;
        }

        private static int slot(long h, long l, long[] hi, long[] lo, int[] count) {
            int mask = hi.length - 1;
            int i = (int) (h ^ (h >>> 29)) & mask;
            while (count[i] != 0 && (hi[i] != h || lo[i] != l)) {
                i = (i + 1) & mask;
            }
            return i;
        }

        private void grow() {
            long[] nh = new long[hi.length * 2], nl = new long[hi.length * 2];
            int[] nc = new int[hi.length * 2];
            for (int i = 0; i < hi.length; i++) {
                if (count[i] != 0) {
                    int j = slot(hi[i], lo[i], nh, nl, nc);
                    nh[j] = hi[i];
                    nl[j] = lo[i];
                    nc[j] = count[i];
                }
            }
            hi = nh;
            lo = nl;
            count = nc;
        }

        long stored(long perCluster) {
            long s = 0;
            for (int c : count) {
                if (c != 0) {
                    s += (c + perCluster - 1) / perCluster;
                }
            }
            return s;
        }
    }
}
