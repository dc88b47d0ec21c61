package org.qdedup.io;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Path;

/** A file layer that passes every call to another; wrappers override only the calls they watch. */
public abstract class ForwardingBlockFile implements BlockFile {
    protected final BlockFile inner;

    protected ForwardingBlockFile(BlockFile inner) {
        this.inner = inner;
    }

    @Override
    public String name() {
        return inner.name();
    }

    @Override
    public long size() throws IOException {
        return inner.size();
    }

    @Override
    public int read(ByteBuffer dst, long pos) throws IOException {
        return inner.read(dst, pos);
    }

    @Override
    public void write(ByteBuffer src, long pos) throws IOException {
        inner.write(src, pos);
    }

    @Override
    public void flush() throws IOException {
        inner.flush();
    }

    @Override
    public void truncate(long size) throws IOException {
        inner.truncate(size);
    }

    @Override
    public boolean punchHole(long offset, long length) throws IOException {
        return inner.punchHole(offset, length);
    }

    @Override
    public long nextData(long pos) throws IOException {
        return inner.nextData(pos);
    }

    @Override
    public long nextHole(long pos) throws IOException {
        return inner.nextHole(pos);
    }

    @Override
    public long allocatedBytes() throws IOException {
        return inner.allocatedBytes();
    }

    @Override
    public FileStamp stamp() throws IOException {
        return inner.stamp();
    }

    @Override
    public Path location() {
        return inner.location();
    }

    @Override
    public boolean readsAroundCache() {
        return inner.readsAroundCache();
    }

    @Override
    public void close() throws IOException {
        inner.close();
    }
}
