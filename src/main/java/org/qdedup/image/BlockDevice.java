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

    /** Takes the pieces of a guest read in order: host file ranges holding the bytes as they are, or buffers. */
    interface ReadSink {
        void file(BlockFile f, long pos, long len) throws IOException;

        void bytes(ByteBuffer b) throws IOException;
    }

    /**
     * Hands {@code len} guest bytes from {@code offset} to {@code sink}, in order: ranges of host files where the data
     * lies as it is (for sending without a copy through user memory), buffers of {@code scratch} for the rest. The
     * ranges stay what they were mapped to until this returns. By default all of it goes through {@code scratch}.
     */
    default void readTo(long offset, long len, ReadSink sink, ByteBuffer scratch) throws IOException {
        for (long done = 0; done < len; ) {
            int n = (int) Math.min(scratch.capacity(), len - done);
            read(scratch.clear().limit(n), offset + done);
            sink.bytes(scratch.flip());
            done += n;
        }
    }

    /**
     * Allocation status of this layer alone (no backing walk) from {@code offset}, for at most {@code length}
     * bytes, as QEMU's driver block-status callback reports it.
     */
    LayerStatus status(long offset, long length) throws IOException;

    /** The backing device, or null. */
    BlockDevice backing();

    /** The host file holding this layer's metadata (and its data unless it has a data file). */
    BlockFile file();

    /**
     * Whether bulk readers should read in few large pieces, holes and all: this layer's data is read around the page
     * cache (see {@link BlockFile#readsAroundCache}), where no readahead joins small reads.
     */
    default boolean prefersLargeReads() {
        return file().readsAroundCache();
    }

    /** Bytes the host allocated for this layer's files (info's actual-size). */
    long allocatedBytes() throws IOException;
}
