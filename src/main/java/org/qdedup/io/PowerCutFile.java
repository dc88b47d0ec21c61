package org.qdedup.io;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;

/**
 * A file that records every write, truncate and flush on top of an initial content, and materialises the file as
 * it would be after a power cut at any point: what was flushed survives; unflushed operations are dropped, or any
 * subset of them kept, or all kept with the last one torn at a 512-byte boundary. For crash tests.
 */
public final class PowerCutFile extends InMemoryFile {
    /** What happens to operations issued after the last flush before the cut. */
    public enum Mode { DROP_UNFLUSHED, RANDOM_SUBSET, TEAR_LAST }

    private record Op(long pos, byte[] data, long truncate, boolean flush) {
    }

    private final String name;
    private final byte[] initial;
    private final MemoryBlockFile live;
    private final List<Op> ops = new ArrayList<>();

    public PowerCutFile(String name, byte[] initial) {
        this.name = name;
        this.initial = initial.clone();
        this.live = new MemoryBlockFile(name, initial);
    }

    /** Operations recorded so far; a cut point is a number from 0 to this. */
    public synchronized int opCount() {
        return ops.size();
    }

    /** Index of the last flush among the first {@code cut} operations, or -1. */
    public synchronized int lastFlushBefore(int cut) {
        for (int i = cut - 1; i >= 0; i--) {
            if (ops.get(i).flush()) {
                return i;
            }
        }
        return -1;
    }

    /** The file's bytes after a power cut once the first {@code cut} operations were issued. */
    public synchronized byte[] crashImage(int cut, Mode mode, Random random) throws IOException {
        MemoryBlockFile f = new MemoryBlockFile(name, initial);
        int lastFlush = lastFlushBefore(cut);
        for (int i = 0; i <= lastFlush; i++) {
            apply(f, ops.get(i), -1);
        }
        List<Op> pending = new ArrayList<>(ops.subList(lastFlush + 1, cut));
        for (int i = 0; i < pending.size(); i++) {
            Op op = pending.get(i);
            switch (mode) {
                case DROP_UNFLUSHED -> {
                }
                case RANDOM_SUBSET -> {
                    if (random.nextBoolean()) {
                        apply(f, op, -1);
                    }
                }
                case TEAR_LAST -> {
                    boolean last = i == pending.size() - 1;
                    int keep = -1;
                    if (last && op.data() != null && op.data().length > 512) {
                        keep = 512 * random.nextInt(op.data().length / 512);
                    }
                    apply(f, op, keep);
                }
            }
        }
        return f.contents();
    }

    private static void apply(MemoryBlockFile f, Op op, int keepBytes) throws IOException {
        if (op.flush()) {
            return;
        }
        if (op.data() == null) {
            f.truncate(op.truncate());
            return;
        }
        byte[] d = keepBytes >= 0 ? Arrays.copyOf(op.data(), keepBytes) : op.data();
        f.write(ByteBuffer.wrap(d), op.pos());
    }

    @Override
    public String name() {
        return name;
    }

    @Override
    public long size() {
        return live.size();
    }

    @Override
    public int read(ByteBuffer dst, long pos) {
        return live.read(dst, pos);
    }

    @Override
    public synchronized void write(ByteBuffer src, long pos) throws IOException {
        byte[] d = new byte[src.remaining()];
        src.duplicate().get(d);
        live.write(src, pos);
        ops.add(new Op(pos, d, 0, false));
    }

    @Override
    public synchronized void flush() {
        ops.add(new Op(0, null, 0, true));
    }

    @Override
    public synchronized void truncate(long size) {
        live.truncate(size);
        ops.add(new Op(0, null, size, false));
    }

    @Override
    public void close() {
    }
}
