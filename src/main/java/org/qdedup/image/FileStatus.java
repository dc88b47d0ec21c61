package org.qdedup.image;

import java.io.IOException;
import org.qdedup.io.BlockFile;

/** Block status of a host file from SEEK_DATA/SEEK_HOLE, as QEMU's file-posix driver reports it. */
final class FileStatus {
    private FileStatus() {
    }

    /**
     * Status at {@code offset} for at most {@code length} bytes of a file whose QEMU-visible length is {@code total}
     * (the file size rounded up to 512).
     */
    static LayerStatus of(BlockFile file, long offset, long length, long total) throws IOException {
        if (offset >= total) {
            return new LayerStatus(0, LayerStatus.EOF, 0, null);
        }
        long bytes = Math.min(length, total - offset);
        long data = file.nextData(offset);
        int flags;
        long n;
        if (data < 0) {
            flags = LayerStatus.ZERO; // trailing hole
            n = bytes;
        } else if (data == offset) {
            long hole = file.nextHole(offset);
            n = hole - offset; // request_alignment is 1 for buffered I/O: no rounding
            flags = LayerStatus.DATA;
        } else {
            n = data - offset;
            flags = LayerStatus.ZERO;
        }
        n = Math.min(n, bytes);
        flags |= LayerStatus.OFFSET_VALID | LayerStatus.ALLOCATED;
        if (offset + n == total) {
            flags |= LayerStatus.EOF;
        }
        return new LayerStatus(n, flags, offset, file);
    }

    /** The length QEMU gives a raw file: its size rounded up to whole 512-byte sectors. */
    static long sectorLength(long fileSize) {
        return (fileSize + 511) & ~511L;
    }
}
