package org.qdedup.image;

import java.io.Closeable;
import java.io.IOException;
import java.nio.ByteBuffer;
import org.qdedup.io.BlockFile;

/** A guest-visible disk: raw file, qcow2 image or a snapshot of one. Reads are safe from several threads. */
public interface BlockDevice extends Closeable {
    /** The image's file name as given (for messages and info). */
    String name();

    /** "raw" or "qcow2". */
    String format();

    /** Virtual size in bytes. */
    long size();

    /** Fills {@code dst.remaining()} bytes from guest offset {@code offset}; the range must lie within the size. */
    void read(ByteBuffer dst, long offset) throws IOException;

    /**
     * Allocation status of this layer alone (no backing walk) from {@code offset}, for at most {@code length}
     * bytes, as QEMU's driver block-status callback reports it.
     */
    LayerStatus status(long offset, long length) throws IOException;

    /** The backing device, or null. */
    BlockDevice backing();

    /** The host file holding this layer's metadata (and its data unless it has a data file). */
    BlockFile file();

    /** Bytes the host allocated for this layer's files (info's actual-size). */
    long allocatedBytes() throws IOException;
}
