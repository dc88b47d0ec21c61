package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.nio.file.Path;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * One request whose clusters carry the same new content twice, the first needing a new cluster and the second one
 * that can be rewritten in place: the content must be stored once (found by StressTest: one stored cluster more
 * than the distinct contents after five minutes of eight clients).
 */
class DedupBatchTest {
    @TempDir
    Path dir;

    static final int CS = 4096;

    @Test
    void aContentTwiceInOneRequestIsStoredOnceWhenOneCopyCouldGoInPlace() throws Exception {
        String img = dir.resolve("b.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, "4M").rc()).isZero();
        Random r = new Random(11);
        byte[] old = new byte[CS], x = new byte[CS];
        r.nextBytes(old);
        r.nextBytes(x);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(old), CS); // guest cluster 1: its own cluster, rewritable in place
            q.flush();
            byte[] twice = new byte[2 * CS];
            System.arraycopy(x, 0, twice, 0, CS);
            System.arraycopy(x, 0, twice, CS, CS);
            q.write(ByteBuffer.wrap(twice), 0); // cluster 0 needs a new cluster; cluster 1 could take x in place
            ByteBuffer got = ByteBuffer.allocate(2 * CS);
            q.read(got, 0);
            assertThat(got.array()).isEqualTo(twice);
        }
        FormatMatrixTest.assertClean(dir, img);
        assertThat(Qemu.hostClusters(dir, img, CS)).as("x stored once").isEqualTo(1);
    }
}
