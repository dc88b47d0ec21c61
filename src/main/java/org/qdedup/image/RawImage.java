package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import org.qdedup.io.BlockFile;

/** A raw image: guest offset = file offset; the size is the file size rounded up to 512 as in QEMU. */
public final class RawImage implements BlockDevice {
    private final BlockFile file;
    private final long size;

    public RawImage(BlockFile file) throws IOException {
        this.file = file;
        this.size = FileStatus.sectorLength(file.size());
    }

    @Override
    public String name() {
        return file.name();
    }

    @Override
    public String format() {
        return "raw";
    }

    @Override
    public long size() {
        return size;
    }

    @Override
    public void read(ByteBuffer dst, long offset) throws IOException {
        file.readFully(dst, offset);
    }

    @Override
    public void readTo(long offset, long len, ReadSink sink, ByteBuffer scratch) throws IOException {
        long inFile = Math.max(0, Math.min(len, file.size() - offset));
        if (inFile > 0) {
            sink.file(file, offset, inFile);
        }
        for (long done = inFile; done < len; ) { // the tail up to a whole sector reads as zeros
            int n = (int) Math.min(scratch.capacity(), len - done);
            ByteBuffer z = scratch.clear().limit(n);
            while (z.hasRemaining()) {
                z.put((byte) 0);
            }
            sink.bytes(z.flip());
            done += n;
        }
    }

    @Override
    public LayerStatus status(long offset, long length) throws IOException {
        return FileStatus.of(file, offset, length, size);
    }

    @Override
    public BlockDevice backing() {
        return null;
    }

    @Override
    public BlockFile file() {
        return file;
    }

    @Override
    public long allocatedBytes() throws IOException {
        return file.allocatedBytes();
    }

    @Override
    public void close() throws IOException {
        file.close();
    }
}
