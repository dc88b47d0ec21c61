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
     * With -t none, large aligned writes go around the page cache and mix with buffered ones (unaligned heads and
     * tails, small writes into neighbouring pages, overwrites both ways); every byte reads back.
     */
    @Test
    void directWritesMixWithBufferedOnesAndReadBackExactly() throws Exception {
        org.junit.jupiter.api.Assumptions.assumeTrue(NativeFs.available());
        Path p = dir.resolve("d");
        int size = (3 << 20) + 1000;
        byte[] model = new byte[size];
        Random rnd = new Random(11);
        try (FileBlockFile f = FileBlockFile.open("d", p, true, FileBlockFile.Lock.NONE, true)) {
            f.directWritesWhenLarge();
            long[][] writes = {{0, 1 << 20}, {(1 << 20) + 7, (1 << 20) + 100}, {4096 * 600, 300_000 + 123},
                    {5000, 10}, {(1 << 20) - 3, 9}, {(3 << 20), 1000}, {4096 * 100, 512 << 10}, {4096 * 101, 20}};
            long aligned = 0;
            long block = Files.getFileStore(p).getBlockSize();
            for (long[] w : writes) {
                byte[] d = new byte[(int) w[1]];
                rnd.nextBytes(d);
                ByteBuffer b = Buffers.direct(d.length).put(d).flip();
                f.write(b, w[0]);
                assertThat(b.hasRemaining()).isFalse();
                System.arraycopy(d, 0, model, (int) w[0], d.length);
                if (w[0] % block == 0 && (w[1] & -block) >= FileBlockFile.DIRECT_MIN) {
                    aligned += w[1] & -block;
                }
                ByteBuffer all = Buffers.direct(size);
                assertThat(f.read(all, 0)).isEqualTo((int) Math.min(size, f.size()));
                byte[] back = toArray(all.flip());
                assertThat(java.util.Arrays.equals(back, 0, back.length, model, 0, back.length)).isTrue();
            }
            assertThat(f.size()).isEqualTo(size);
            assertThat(f.directBytesWritten()).as("bytes written around the page cache").isEqualTo(aligned).isPositive();
        }
        assertThat(java.util.Arrays.equals(Files.readAllBytes(p), model)).isTrue();
    }

    /**
     * Convert's reads of a file that is not in the page cache go around it: they return the file's bytes, a dirty
     * cached patch inside the range included (the kernel writes it back first) and the end of a file that stops inside
     * a block, and leave the cache as it was. A file mostly in the cache reads buffered.
     */
    @Test
    void directReadsOfAnUncachedFileSeeEveryByteAndLeaveTheCacheAlone() throws Exception {
        org.junit.jupiter.api.Assumptions.assumeTrue(NativeFs.available());
        Path p = dir.resolve("r");
        int aligned = 3 << 20;
        int size = aligned + 1000;
        byte[] model = new byte[size];
        new Random(5).nextBytes(model);
        // The aligned bulk written with O_DIRECT, so none of it is in the page cache; the tail buffered.
        try (var ch = java.nio.channels.FileChannel.open(p, java.nio.file.StandardOpenOption.CREATE,
                java.nio.file.StandardOpenOption.WRITE, com.sun.nio.file.ExtendedOpenOption.DIRECT)) {
            ByteBuffer b = Buffers.direct(aligned).put(model, 0, aligned).flip();
            while (b.hasRemaining()) {
                ch.write(b, b.position());
            }
        }
        try (var ch = java.nio.channels.FileChannel.open(p, java.nio.file.StandardOpenOption.WRITE)) {
            ch.write(ByteBuffer.wrap(model, aligned, 1000), aligned);
            // A dirty, unsynced patch inside the bulk: the direct read must see it, not the older bytes on disk.
            byte[] patch = new byte[5000];
            new Random(6).nextBytes(patch);
            ch.write(ByteBuffer.wrap(patch), (1 << 20) + 123);
            System.arraycopy(patch, 0, model, (1 << 20) + 123, patch.length);
        }
        try (NativeFs.Fd probe = NativeFs.open(p, false)) {
            org.junit.jupiter.api.Assumptions.assumeTrue(probe.cachedPages(0, size) >= 0, "cachestat(2) needs Linux 6.5");
            assertThat(probe.cachedPages(0, size)).as("pages cached before the reads").isLessThan(8);
        }
        try (FileBlockFile f = FileBlockFile.open("r", p, false, FileBlockFile.Lock.NONE)) {
            f.directReadsWhenUncached();
            ByteBuffer all = Buffers.direct(4 << 20);
            assertThat(f.read(all, 0)).isEqualTo(size);
            assertThat(java.util.Arrays.equals(toArray(all.flip()), model)).isTrue();
            assertThat(f.directBytesRead()).as("bytes read around the page cache").isGreaterThanOrEqualTo(aligned);
            try (NativeFs.Fd probe = NativeFs.open(p, false)) {
                assertThat(probe.cachedPages(0, size)).as("pages cached after the direct read").isLessThan(8);
            }
            // Unaligned reads take the buffered path beside the direct one.
            long direct = f.directBytesRead();
            ByteBuffer odd = Buffers.direct(300_000);
            assertThat(f.read(odd, 777)).isEqualTo(300_000);
            assertThat(java.util.Arrays.equals(toArray(odd.flip()), 0, 300_000, model, 777, 777 + 300_000)).isTrue();
            assertThat(f.directBytesRead()).isEqualTo(direct);
        }
        // Once the file is in the cache, a new reader of it stays buffered.
        Files.readAllBytes(p);
        try (FileBlockFile f = FileBlockFile.open("r", p, false, FileBlockFile.Lock.NONE)) {
            f.directReadsWhenUncached();
            ByteBuffer again = Buffers.direct(2 << 20);
            assertThat(f.read(again, 4096)).isEqualTo(2 << 20);
            assertThat(java.util.Arrays.equals(toArray(again.flip()), 0, 2 << 20, model, 4096, 4096 + (2 << 20))).isTrue();
            assertThat(f.directBytesRead()).as("a cached file reads buffered").isZero();
        }
    }

    /** contentEquals (dedup's confirmation of a candidate): equal, one byte off, and a range past the end. */
    @Test
    void contentEqualsComparesTheFileBytesExactly() throws Exception {
        byte[] data = new byte[3 * 4096 + 100];
        new Random(3).nextBytes(data);
        Path p = dir.resolve("c");
        Files.write(p, data);
        try (FileBlockFile f = FileBlockFile.open("c", p, false, FileBlockFile.Lock.NONE)) {
            assertThat(f.contentEquals(4096, data, 4096, 4096)).isTrue();
            assertThat(f.contentEquals(0, data, 0, data.length)).isTrue();
            byte[] other = data.clone();
            other[4096 + 4095] ^= 1;
            assertThat(f.contentEquals(4096, other, 4096, 4096)).isFalse();
            assertThat(f.contentEquals(2 * 4096, data, 4096, 4096)).isFalse();
            assertThat(f.contentEquals(3 * 4096, data, 3 * 4096, 4096)).as("past the end").isFalse();
        }
    }

    private static byte[] toArray(ByteBuffer b) {
        byte[] a = new byte[b.remaining()];
        b.get(a);
        return a;
    }
}
