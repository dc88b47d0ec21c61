package org.qdedup.io;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.Arrays;

/** An in-memory file for tests. */
public final class MemoryBlockFile extends InMemoryFile {
    private final String name;
    private byte[] data;
    private int size;

    public MemoryBlockFile(String name, byte[] initial) {
        this.name = name;
        this.data = initial.clone();
        this.size = initial.length;
    }

    public synchronized byte[] contents() {
        return Arrays.copyOf(data, size);
    }

    @Override
    public String name() {
        return name;
    }

    @Override
    public synchronized long size() {
        return size;
    }

    @Override
    public synchronized int read(ByteBuffer dst, long pos) {
        if (pos >= size) {
            return 0;
        }
        int n = (int) Math.min(dst.remaining(), size - pos);
        dst.put(data, (int) pos, n);
        return n;
    }

    @Override
    public synchronized void write(ByteBuffer src, long pos) throws IOException {
        long end = pos + src.remaining();
        if (end > Integer.MAX_VALUE - 8) {
            throw new IOException(name + ": in-memory file too large");
        }
        ensure((int) end);
        src.get(data, (int) pos, src.remaining());
        size = Math.max(size, (int) end);
    }

    private void ensure(int n) {
        if (n > data.length) {
            data = Arrays.copyOf(data, Math.max(n, data.length * 2));
        }
    }

    @Override
    public void flush() {
    }

    @Override
    public synchronized void truncate(long newSize) {
        ensure((int) newSize);
        if (newSize < size) {
            Arrays.fill(data, (int) newSize, size, (byte) 0);
        }
        size = (int) newSize;
    }

    @Override
    public void close() {
    }
}
