package org.qdedup;

import com.sun.nio.file.ExtendedOpenOption;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import org.qdedup.io.Buffers;
import org.qdedup.io.NativeFs;

/** Test helper: puts files out of the page cache, as after a cold boot, so that the cold read paths run. */
final class PageCache {
    private PageCache() {
    }

    /**
     * Rewrites {@code file} through O_DIRECT into a new file that takes its name: none of it stays cached but a
     * tail shorter than a page (written buffered). Holes stay holes (only the data extents are copied).
     */
    static void evict(Path file) throws IOException {
        Path tmp = file.resolveSibling(file.getFileName() + ".evicting");
        long size = Files.size(file);
        long aligned = size & -Buffers.PAGE;
        ByteBuffer b = Buffers.direct(1 << 20);
        try (FileChannel in = FileChannel.open(file, StandardOpenOption.READ);
             NativeFs.Fd extents = NativeFs.open(file, false);
             FileChannel out = FileChannel.open(tmp, StandardOpenOption.CREATE_NEW, StandardOpenOption.WRITE,
                     ExtendedOpenOption.DIRECT)) {
            for (long data = extents.seekData(0); data >= 0 && data < aligned; data = extents.seekData(data)) {
                long hole = Math.min(aligned, extents.seekHole(data));
                for (long pos = data & -Buffers.PAGE; pos < hole; pos += b.limit()) {
                    b.clear().limit((int) Math.min(b.capacity(), hole - pos));
                    while (b.hasRemaining() && in.read(b, pos + b.position()) > 0) {
                        // whole buffers but at the end of the file
                    }
                    b.flip();
                    while (b.hasRemaining()) {
                        out.write(b, pos + b.position());
                    }
                }
                data = hole;
                if (data >= aligned) {
                    break;
                }
            }
        }
        try (FileChannel in = FileChannel.open(file, StandardOpenOption.READ);
             java.io.RandomAccessFile out = new java.io.RandomAccessFile(tmp.toFile(), "rw")) {
            out.setLength(size); // a file that ends in a hole keeps its length
            if (size > aligned) {
                ByteBuffer tail = ByteBuffer.allocate((int) (size - aligned));
                in.read(tail, aligned);
                out.getChannel().write(tail.flip(), aligned);
            }
        }
        Files.move(tmp, file, StandardCopyOption.REPLACE_EXISTING);
    }
}
