package org.qdedup.io;

import java.io.Closeable;
import java.io.IOException;
import java.nio.ByteBuffer;

/**
 * The file layer: positional reads and writes on one host file, format-blind.
 * Implementations: {@link FileBlockFile} (a real file), {@link MemoryBlockFile} (tests).
 */
public interface BlockFile extends Closeable {
    /** A name for messages: the path as the user gave it. */
    String name();

    long size() throws IOException;

    /**
     * Reads {@code dst.remaining()} bytes at {@code pos}, or fewer at end of file.
     *
     * @return bytes read; less than asked only at end of file
     */
    int read(ByteBuffer dst, long pos) throws IOException;

    /** Writes all of {@code src} at {@code pos}. */
    void write(ByteBuffer src, long pos) throws IOException;

    void flush() throws IOException;

    void truncate(long size) throws IOException;

    /** Start of the first data extent at or after {@code pos}, or -1 if none (SEEK_DATA); all data by default. */
    default long nextData(long pos) throws IOException {
        return pos < size() ? pos : -1;
    }

    /** Start of the first hole at or after {@code pos} (SEEK_HOLE); the end of the file counts as a hole. */
    default long nextHole(long pos) throws IOException {
        return Math.max(pos, size());
    }

    /** Bytes the host file system has allocated for the file (st_blocks * 512). */
    default long allocatedBytes() throws IOException {
        return size();
    }

    /** Whether the file holds exactly {@code data[off, off + len)} at {@code pos}. */
    default boolean contentEquals(long pos, byte[] data, int off, int len) throws IOException {
        byte[] b = new byte[len];
        return read(ByteBuffer.wrap(b), pos) == len && java.util.Arrays.equals(b, 0, len, data, off, off + len);
    }

    /** Gives a range back to the host file system (it then reads as zeros); false when it cannot. */
    default boolean punchHole(long offset, long length) throws IOException {
        return false;
    }

    /**
     * What identifies this file's current state from outside: size, inode, change and modification times. Any
     * write by anyone changes it. Null when the file layer cannot tell (then nothing is tied to the file).
     */
    default FileStamp stamp() throws IOException {
        return null;
    }

    /** Where the file lives, so that companion files can sit beside it; null for files without a place. */
    default java.nio.file.Path location() {
        return null;
    }

    /**
     * Sends {@code len} bytes at {@code pos} to {@code target} (all of them, blocking); a real file does it in the
     * kernel without copying through user memory. Fails when the file ends first.
     */
    default void transferTo(long pos, long len, java.nio.channels.WritableByteChannel target) throws IOException {
        ByteBuffer b = ByteBuffer.allocate((int) Math.min(len, 1 << 20));
        for (long done = 0; done < len; ) {
            int n = (int) Math.min(b.capacity(), len - done);
            b.clear().limit(n);
            if (read(b, pos + done) < n) {
                throw new java.io.EOFException(name() + ": end of file at " + (pos + done) + " while sending " + len + " bytes from " + pos);
            }
            b.flip();
            while (b.hasRemaining()) {
                target.write(b);
            }
            done += n;
        }
    }

    /**
     * Whether large reads of this file go around the page cache (see FileBlockFile#directReadsWhenUncached): readers
     * then gather small pieces lying close together into one large read, as the cache's readahead would have.
     */
    default boolean readsAroundCache() {
        return false;
    }

    /** Reads exactly {@code dst.remaining()} bytes, filling with zeros past end of file. */
    default void readFully(ByteBuffer dst, long pos) throws IOException {
        int want = dst.remaining();
        int got = read(dst, pos);
        if (got < want) {
            while (dst.hasRemaining()) {
                dst.put((byte) 0);
            }
        }
    }
}
