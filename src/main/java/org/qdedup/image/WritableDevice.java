package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;

/**
 * A device open for writing. Safe for concurrent callers: metadata changes under one lock, data transfers of
 * in-place writes and of reads outside it. Completed writes are durable after {@link #flush()}.
 */
public interface WritableDevice extends BlockDevice {
    /** Writes all of {@code src} at guest offset {@code offset} (any alignment, any length within the size). */
    void write(ByteBuffer src, long offset) throws IOException;

    /** Makes the range read as zeros; with {@code unmap} whole clusters give their space back. */
    void writeZeroes(long offset, long length, boolean unmap) throws IOException;

    /** Discards the range: it reads as zeros afterwards and whole clusters give their space back. */
    void discard(long offset, long length) throws IOException;

    /** Makes every completed write durable. */
    void flush() throws IOException;
}
