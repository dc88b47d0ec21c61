package org.qdedup.ops;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicLong;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ChainStatus;
import org.qdedup.io.BlockFile;
import org.qdedup.io.FileBlockFile;

/**
 * Copies a device's guest-visible bytes into a target (raw file or qcow2 image): reads only what block status says
 * holds data, skips zero blocks (the target stays sparse), and works on chunks in parallel so reading, zero
 * detection and writing overlap on all cores.
 */
public final class Converter {
    /** Where converted bytes go. */
    public interface Target {
        void write(ByteBuffer src, long pos) throws IOException;

        /** Makes a range read as zeros (only called when the target was not fresh). */
        void zero(long pos, long len) throws IOException;
    }

    /** A raw file target: zeros become holes where the file system can punch them. */
    public static Target raw(BlockFile f) {
        return new Target() {
            @Override
            public void write(ByteBuffer src, long pos) throws IOException {
                f.write(src, pos);
            }

            @Override
            public void zero(long pos, long len) throws IOException {
                zeroTarget(f, pos, len);
            }
        };
    }

    /** A writable image target: zeros become zero clusters. */
    public static Target image(org.qdedup.image.WritableDevice d) {
        return new Target() {
            @Override
            public void write(ByteBuffer src, long pos) throws IOException {
                d.write(src, pos);
            }

            @Override
            public void zero(long pos, long len) throws IOException {
                d.writeZeroes(pos, len, true);
            }
        };
    }

    /** Chunk one worker handles at a time. */
    static final int CHUNK = 2 << 20;
    /** Zero-detection granularity, qemu-img's default -S 4k. */
    static final int SPARSE = 4096;
    private static final ByteBuffer ZEROS = ByteBuffer.allocateDirect(SPARSE);

    private Converter() {
    }

    /**
     * @param target      a target at least {@code src.size()} bytes long
     * @param freshTarget true when the target reads as zeros everywhere (new file): zero ranges are then skipped;
     *                    otherwise they are punched or written as zeros
     */
    public static void copy(BlockDevice src, Target target, boolean freshTarget, Progress progress) throws IOException {
        long size = src.size();
        int threads = Math.max(1, Math.min(4, Runtime.getRuntime().availableProcessors()));
        AtomicLong next = new AtomicLong();
        ExecutorService pool = Executors.newFixedThreadPool(threads, r -> {
            Thread t = new Thread(r, "convert");
            t.setDaemon(true);
            return t;
        });
        try {
            List<Future<?>> fs = new ArrayList<>();
            for (int i = 0; i < threads; i++) {
                fs.add(pool.submit(() -> {
                    ByteBuffer buf = ByteBuffer.allocateDirect(CHUNK);
                    for (;;) {
                        long start = next.getAndAdd(CHUNK);
                        if (start >= size) {
                            return null;
                        }
                        long end = Math.min(size, start + CHUNK);
                        copyChunk(src, target, freshTarget, start, end, buf);
                        progress.add(end - start);
                    }
                }));
            }
            for (Future<?> f : fs) {
                f.get();
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IOException("interrupted", e);
        } catch (ExecutionException e) {
            Throwable c = e.getCause();
            if (c instanceof IOException io) {
                throw io;
            }
            if (c instanceof RuntimeException re) {
                throw re;
            }
            throw new IOException(c);
        } finally {
            pool.shutdownNow();
        }
    }

    private static void copyChunk(BlockDevice src, Target target, boolean fresh, long start, long end, ByteBuffer buf)
            throws IOException {
        long pos = start;
        while (pos < end) {
            ChainStatus.Entry e = ChainStatus.entry(src, pos, end - pos);
            long len = e.length();
            if (len <= 0) {
                throw new IOException(src.name() + ": block status made no progress at offset " + pos);
            }
            if (e.zero()) {
                if (!fresh) {
                    target.zero(pos, len);
                }
            } else {
                buf.clear().limit((int) len);
                src.read(buf, pos);
                buf.flip();
                writeNonZero(target, buf, pos, fresh);
            }
            pos += len;
        }
    }

    /** Writes the buffer at {@code pos}, leaving out 4 KiB blocks of zeros when the target already reads as zeros. */
    private static void writeNonZero(Target target, ByteBuffer buf, long pos, boolean fresh) throws IOException {
        if (!fresh) {
            target.write(buf, pos);
            return;
        }
        int n = buf.limit();
        int runStart = -1;
        for (int off = 0; off < n; off += SPARSE) {
            int blk = Math.min(SPARSE, n - off);
            boolean zero = buf.slice(off, blk).mismatch(ZEROS.slice(0, blk)) < 0;
            if (!zero && runStart < 0) {
                runStart = off;
            } else if (zero && runStart >= 0) {
                target.write(buf.slice(runStart, off - runStart), pos + runStart);
                runStart = -1;
            }
        }
        if (runStart >= 0) {
            target.write(buf.slice(runStart, n - runStart), pos + runStart);
        }
    }

    private static void zeroTarget(BlockFile target, long pos, long len) throws IOException {
        if (target instanceof FileBlockFile f && f.punchHole(pos, len)) {
            return;
        }
        ByteBuffer z = ByteBuffer.allocate((int) Math.min(len, CHUNK));
        for (long p = pos; p < pos + len; ) {
            int n = (int) Math.min(z.capacity(), pos + len - p);
            target.write(z.clear().limit(n), p);
            p += n;
        }
    }
}
