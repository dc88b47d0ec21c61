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
}
