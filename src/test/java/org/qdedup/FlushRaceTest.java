package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Images;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;
import org.qdedup.io.FaultyFile;
import org.qdedup.io.MemoryBlockFile;
import org.qdedup.io.PowerCutFile;

/**
 * A guest request that lands between a flush's write-back and its freeing of clusters (another NBD connection
 * writing while one flushes): the clusters it releases must not be freed before its L2 change is on disk, else a
 * crash right after the flush leaves an entry pointing at a cluster with refcount 0 (found by Kill9Test: guest
 * clusters reading zeros from punched clusters after kill -9).
 */
class FlushRaceTest {
    @TempDir
    Path dir;

    static final int CS = 4096;

    @Test
    @Timeout(60)
    void aDiscardDuringAFlushIsDurableBeforeItsClusterIsFreed() throws Exception {
        MemoryBlockFile m = new MemoryBlockFile("new", new byte[0]);
        Qcow2Create.write(m, CreateOptions.defaults(1L << 20).withClusterBits(12));
        PowerCutFile pc = new PowerCutFile("r.qcow2", m.contents());
        FaultyFile ff = new FaultyFile(pc);
        byte[] data = new byte[2 * CS];
        new Random(1).nextBytes(data);
        try (Qcow2Image q = Images.openWritable(ff)) {
            q.write(ByteBuffer.wrap(data), 0);
            q.flush();
            q.discard(CS, CS); // a deferred free, so that the flush below frees clusters
            Thread[] other = new Thread[1];
            ff.beforeNext(FaultyFile.Op.FLUSH, () -> {
                // Inside the flush's write-back: another connection discards guest cluster 0 and waits for the lock.
                other[0] = Thread.ofPlatform().start(() -> {
                    try {
                        q.discard(0, CS);
                    } catch (Exception e) {
                        throw new RuntimeException(e);
                    }
                });
                while (other[0].getState() != Thread.State.WAITING && other[0].isAlive()) {
                    Thread.onSpinWait();
                }
            });
            q.flush();
            other[0].join();
            // A crash now: whatever the discard's L2 change, no durable entry may point at a freed cluster.
            Path img = dir.resolve("r.qcow2");
            Files.write(img, pc.crashImage(pc.opCount(), PowerCutFile.Mode.DROP_UNFLUSHED, new Random(0)));
            Qemu.Result check = Qemu.imgRaw(dir, "check", img.toString());
            assertThat(check.exit()).as("qemu-img check of the crash state after the flush (0 clean, 3 leaks):%n%s",
                    check.out()).isIn(0, 3);
        }
    }
}
