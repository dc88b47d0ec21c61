package org.qdedup.io;

import static org.assertj.core.api.Assertions.assertThat;

import java.lang.foreign.MemorySegment;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class FileBlockFileTest {
    @TempDir
    Path dir;

    @Test
    void directBuffersStartOnAPageAndHaveTheSizeAsked() {
        for (int size : new int[]{0, 1, 100, 4095, 4096, 4097, 65536, (2 << 20) + 3}) {
            ByteBuffer b = Buffers.direct(size);
            assertThat(b.capacity()).isEqualTo(size);
            assertThat(MemorySegment.ofBuffer(b).address() % Buffers.PAGE).isZero();
        }
    }

    @Test
    void heapBuffersLargerThanTheBounceBufferRoundTripAtUnalignedOffsets() throws Exception {
        byte[] data = new byte[Buffers.BOUNCE_MAX * 2 + 12345];
        new Random(7).nextBytes(data);
        Path p = dir.resolve("f");
        try (FileBlockFile f = FileBlockFile.open("f", p, true, FileBlockFile.Lock.NONE, true)) {
            ByteBuffer src = ByteBuffer.wrap(data, 3, data.length - 3);
            f.write(src, 777);
            assertThat(src.hasRemaining()).isFalse();
            assertThat(f.size()).isEqualTo(777 + data.length - 3);

            // A heap read that runs past the end returns what is there.
            byte[] back = new byte[data.length];
            ByteBuffer dst = ByteBuffer.wrap(back, 1, data.length - 1);
            int n = f.read(dst, 777);
            assertThat(n).isEqualTo(data.length - 3);
            assertThat(dst.position()).isEqualTo(1 + data.length - 3);
            assertThat(java.util.Arrays.equals(back, 1, 1 + data.length - 3, data, 3, data.length)).isTrue();
        }
        byte[] onDisk = Files.readAllBytes(p);
        assertThat(java.util.Arrays.equals(onDisk, 777, onDisk.length, data, 3, data.length)).isTrue();
    }

    /**
     * Large writes go around the page cache and mix with buffered ones (unaligned heads and tails, small writes into
     * neighbouring pages); every byte reads back; a large read of uncached data goes around the cache as well (it
     * leaves no page cached).
     */
    @Test
    void directWritesAndReadsMixWithBufferedOnesAndReadBackExactly() throws Exception {
        org.junit.jupiter.api.Assumptions.assumeTrue(NativeFs.available());
        Path p = dir.resolve("d");
        int size = (3 << 20) + 1000;
        byte[] model = new byte[size];
        Random rnd = new Random(11);
        try (FileBlockFile f = FileBlockFile.open("d", p, true, FileBlockFile.Lock.NONE, true);
             NativeFs.Fd probe = NativeFs.open(p, false)) {
            f.directWritesWhenLarge();
            long[][] writes = {{0, 1 << 20}, {(1 << 20) + 7, (1 << 20) + 100}, {4096 * 600, 300_000 + 123},
                    {5000, 10}, {(1 << 20) - 3, 9}, {(3 << 20), 1000}, {4096 * 100, 512 << 10}};
            for (long[] w : writes) {
                byte[] d = new byte[(int) w[1]];
                rnd.nextBytes(d);
                ByteBuffer b = Buffers.direct(d.length).put(d).flip();
                f.write(b, w[0]);
                assertThat(b.hasRemaining()).isFalse();
                System.arraycopy(d, 0, model, (int) w[0], d.length);
            }
            assertThat(f.size()).isEqualTo(size);
            long cached = probe.cachedPages(4096 * 100, 512 << 10);
            org.junit.jupiter.api.Assumptions.assumeTrue(cached >= 0, "no cachestat(2) on this kernel");
            assertThat(cached).as("pages of the last (direct) write left in the page cache").isZero();

            try (FileBlockFile r = FileBlockFile.open("d", p, false, FileBlockFile.Lock.NONE)) {
                r.directReadsWhenUncached();
                ByteBuffer part = Buffers.direct(512 << 10);
                assertThat(r.read(part, 4096 * 100)).isEqualTo(512 << 10);
                assertThat(probe.cachedPages(4096 * 100, 512 << 10)).as("pages a direct read brought into the cache").isZero();
                assertThat(java.util.Arrays.equals(toArray(part.flip()), 0, 512 << 10, model, 4096 * 100, 4096 * 100 + (512 << 10))).isTrue();
                // A read that runs past the unaligned end of the file (part of it cached: it goes buffered).
                ByteBuffer all = Buffers.direct(4 << 20);
                assertThat(r.read(all, 0)).isEqualTo(size);
                byte[] back = new byte[size];
                all.flip().get(back);
                assertThat(java.util.Arrays.equals(back, model)).isTrue();
            }
        }
        assertThat(java.util.Arrays.equals(Files.readAllBytes(p), model)).isTrue();
    }

    private static byte[] toArray(ByteBuffer b) {
        byte[] a = new byte[b.remaining()];
        b.get(a);
        return a;
    }
}
