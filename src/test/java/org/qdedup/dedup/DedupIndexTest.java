package org.qdedup.dedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.security.MessageDigest;
import java.util.HashMap;
import java.util.Map;
import java.util.Random;
import org.junit.jupiter.api.Test;

class DedupIndexTest {
    private static byte[] sha(byte[] data) throws Exception {
        return MessageDigest.getInstance("SHA-256").digest(data);
    }

    private static byte[] sha(long v) throws Exception {
        return sha(ByteBuffer.allocate(8).putLong(v).array());
    }

    @Test
    void findsByHashAndForgetsByCluster() throws Exception {
        DedupIndex idx = new DedupIndex(16);
        Map<Long, byte[]> model = new HashMap<>();
        Random r = new Random(1);
        long[] out = new long[64];
        for (int step = 0; step < 200_000; step++) {
            long cluster = r.nextInt(5000);
            if (r.nextInt(3) == 0) {
                assertThat(idx.removeCluster(cluster)).isEqualTo(model.remove(cluster) != null);
            } else {
                byte[] h = sha(r.nextInt(3000));
                idx.put(h, cluster);
                model.put(cluster, h);
            }
            if (step % 1000 == 0) {
                assertThat(idx.size()).isEqualTo(model.size());
                for (Map.Entry<Long, byte[]> e : model.entrySet()) {
                    int n = idx.candidates(e.getValue(), out);
                    boolean found = false;
                    for (int i = 0; i < n; i++) {
                        found |= out[i] == e.getKey();
                    }
                    assertThat(found).as("cluster %d found by its hash", e.getKey()).isTrue();
                    assertThat(idx.containsCluster(e.getKey())).isTrue();
                }
            }
        }
    }

    @Test
    void hashesSharingTheInRamKeyAreBothCandidates() throws Exception {
        // Two different contents whose SHA-256 share the 32-bit in-RAM fragment: a birthday search finds them.
        Map<Integer, Long> seen = new HashMap<>();
        long a = -1, b = -1;
        for (long v = 0; a < 0; v++) {
            Long prev = seen.putIfAbsent(DedupIndex.fragment(sha(v)), v);
            if (prev != null) {
                a = prev;
                b = v;
            }
        }
        assertThat(sha(a)).isNotEqualTo(sha(b));
        DedupIndex idx = new DedupIndex(16);
        idx.put(sha(a), 7);
        long[] out = new long[4];
        // The index only narrows the search: the caller must confirm on the full hash, and here it would not match.
        assertThat(idx.candidates(sha(b), out)).isEqualTo(1);
        assertThat(out[0]).isEqualTo(7);
        idx.put(sha(b), 9);
        assertThat(idx.candidates(sha(a), out)).isEqualTo(2);
    }

    @Test
    void memoryPerEntryStaysUnderSixteenBytes() throws Exception {
        for (int n : new int[]{1_000_000, Integer.getInteger("qdedup.index.large", 10_000_000)}) {
            DedupIndex idx = new DedupIndex(16);
            byte[] h = new byte[32];
            Random r = new Random(n);
            for (int i = 0; i < n; i++) {
                r.nextBytes(h);
                idx.put(h, i);
            }
            // The whole object graph as the JVM lays it out (headers, padding, both arrays), not our own sum.
            long bytes = org.openjdk.jol.info.GraphLayout.parseInstance(idx).totalSize();
            double perEntry = (double) bytes / n;
            System.out.printf("dedup index: %d entries, %d bytes measured by JOL (%d by its own count), %.2f bytes/entry%n",
                    n, bytes, idx.memoryBytes(), perEntry);
            assertThat(perEntry).isLessThanOrEqualTo(16.0);
            assertThat(Math.abs(bytes - idx.memoryBytes())).as("its own count, used by stats").isLessThan(1024);
        }
    }
}
