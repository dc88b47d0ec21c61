package org.qdedup.ops;

import java.io.IOException;
import java.nio.ByteBuffer;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ChainStatus;
import org.qdedup.io.BlockFile;
import org.qdedup.io.Buffers;
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

        /** Zero detection granularity: blocks of this size that are all zeros are not written. */
        default int granularity() {
            return SPARSE;
        }

        /**
         * Writes {@code n} runs of a chunk: {@code runs[2k]} and {@code runs[2k + 1]} are the start and end of run k
         * in {@code buf}, which holds the bytes at {@code pos}.
         */
        default void writeRuns(ByteBuffer buf, long pos, int[] runs, int n) throws IOException {
            for (int k = 0; k < n; k++) {
                write(buf.slice(runs[2 * k], runs[2 * k + 1] - runs[2 * k]), pos + runs[2 * k]);
            }
        }
    }

    /** A raw file target: zeros become holes where the file system can punch them. */
    public static Target raw(BlockFile f) {
        // One writer at a time: parallel writes to one file spin on its inode lock in the kernel and burn the CPU the
        // readers and zero detection need, as qemu-img's in-order writes do not.
        var writeLock = new java.util.concurrent.locks.ReentrantLock();
        return new Target() {
            @Override
            public void write(ByteBuffer src, long pos) throws IOException {
                writeLock.lock();
                try {
                    f.write(src, pos);
                } finally {
                    writeLock.unlock();
                }
            }

            @Override
            public void writeRuns(ByteBuffer buf, long pos, int[] runs, int n) throws IOException {
                // The lock once per chunk: a chunk of mixed data and zeros has hundreds of runs, and handing the lock
                // over between workers for each cost a futex call on both sides.
                writeLock.lock();
                try {
                    Target.super.writeRuns(buf, pos, runs, n); // each write() below takes the held lock again
                } finally {
                    writeLock.unlock();
                }
            }

            @Override
            public void zero(long pos, long len) throws IOException {
                zeroTarget(f, pos, len);
            }
        };
    }

    /** A qcow2 target written compressed, cluster by cluster. */
    public static Target compressed(org.qdedup.image.Qcow2Image q) {
        long cs = q.header().clusterSize();
        return new Target() {
            @Override
            public void write(ByteBuffer src, long pos) throws IOException {
                // Converter chunks are cluster-aligned; runs of non-zero blocks start on 4 KiB boundaries, so a
                // run may begin or end inside a cluster: widen to whole clusters by reading back what is there.
                long start = pos - pos % cs;
                long end = Math.min(q.size(), (pos + src.remaining() + cs - 1) / cs * cs);
                ByteBuffer whole = ByteBuffer.allocate((int) (end - start));
                if (start != pos || end != pos + src.remaining()) {
                    q.read(whole, start);
                    whole.clear();
                }
                whole.put((int) (pos - start), src, src.position(), src.remaining());
                for (long c = start; c < end; c += cs) {
                    q.writer().writeCompressed(whole.slice((int) (c - start), (int) Math.min(cs, end - c)), c);
                }
                src.position(src.limit());
            }

            @Override
            public void zero(long pos, long len) throws IOException {
                q.writeZeroes(pos, len, true);
            }

            @Override
            public int granularity() {
                return (int) Math.min(cs, CHUNK);
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

            @Override
            public int granularity() {
                // Whole clusters: a write of part of a new cluster would read the rest back first.
                return d instanceof org.qdedup.image.Qcow2Image q ? (int) Math.min(q.header().clusterSize(), CHUNK) : SPARSE;
            }
        };
    }

    /** Chunk one worker handles at a time. */
    static final int CHUNK = 2 << 20;
    /** Zero-detection granularity, qemu-img's default -S 4k. */
    static final int SPARSE = 4096;
    private static final java.lang.foreign.MemorySegment ZERO_SEGMENT = java.lang.foreign.MemorySegment.ofArray(new byte[SPARSE]);

    private Converter() {
    }

    /**
     * @param target      a target at least {@code src.size()} bytes long
     * @param freshTarget true when the target reads as zeros everywhere (new file): zero ranges are then skipped;
     *                    otherwise they are punched or written as zeros
     */
    public static void copy(BlockDevice src, Target target, boolean freshTarget, Progress progress) throws IOException {
        long size = src.size();
        // More workers than cores: with a cold cache they keep several reads in flight, as qemu-img's coroutines do.
        int threads = Integer.getInteger("qdedup.convert.threads", Math.max(4, 2 * Runtime.getRuntime().availableProcessors()));
        ParallelChunks.run(size, CHUNK, threads, "convert", () -> {
            ByteBuffer buf = Buffers.direct(CHUNK);
            return (start, end) -> {
                copyChunk(src, target, freshTarget, start, end, buf);
                progress.add(end - start);
            };
        });
    }

    private static void copyChunk(BlockDevice src, Target target, boolean fresh, long start, long end, ByteBuffer buf)
            throws IOException {
        if (fresh) {
            copyIntoFresh(src, target, start, end, buf);
            return;
        }
        for (long pos = start; pos < end; ) {
            ChainStatus.Entry e = entry(src, pos, end);
            if (e.zero()) {
                target.zero(pos, e.length());
            } else {
                buf.clear().limit((int) e.length());
                src.read(buf, pos);
                target.write(buf.flip(), pos);
            }
            pos += e.length();
        }
    }

    private static ChainStatus.Entry entry(BlockDevice src, long pos, long end) throws IOException {
        ChainStatus.Entry e = ChainStatus.entry(src, pos, end - pos);
        if (e.length() <= 0) {
            throw new IOException(src.name() + ": block status made no progress at offset " + pos);
        }
        return e;
    }

    /**
     * Copies a chunk into a target that reads as zeros: zero extents are skipped, data extents written without their
     * 4 KiB blocks of zeros. When the source is read around the page cache and the chunk's data lies in several
     * extents, some of them small (small files on ext4, data between zero clusters), the stretch from the first to
     * the last data byte is read in one read: one small direct read per extent would wait on the disk each time.
     */
    private static void copyIntoFresh(BlockDevice src, Target target, long start, long end, ByteBuffer buf)
            throws IOException {
        long[] data = new long[2 * 8]; // (offset, length) of each data extent, neighbours merged
        int n = 0;
        boolean small = false;
        for (long pos = start; pos < end; ) {
            ChainStatus.Entry e = entry(src, pos, end);
            if (!e.zero()) {
                if (n > 0 && data[n - 2] + data[n - 1] == pos) {
                    data[n - 1] += e.length();
                } else {
                    if (n == data.length) {
                        data = java.util.Arrays.copyOf(data, 2 * n);
                    }
                    data[n++] = pos;
                    data[n++] = e.length();
                }
            }
            pos += e.length();
        }
        for (int i = 0; i < n; i += 2) {
            small |= data[i + 1] < org.qdedup.io.FileBlockFile.DIRECT_MIN;
        }
        if (n > 2 && small && src.prefersLargeReads()) {
            long first = data[0];
            buf.clear().limit((int) (data[n - 2] + data[n - 1] - first));
            src.read(buf, first);
            for (int i = 0; i < n; i += 2) {
                writeNonZero(target, buf.slice((int) (data[i] - first), (int) data[i + 1]), data[i]);
            }
            return;
        }
        for (int i = 0; i < n; i += 2) {
            buf.clear().limit((int) data[i + 1]);
            src.read(buf, data[i]);
            writeNonZero(target, buf.flip(), data[i]);
        }
    }

    /** Writes the buffer at {@code pos} into a target that reads as zeros, leaving out its blocks of zeros. */
    private static void writeNonZero(Target target, ByteBuffer buf, long pos) throws IOException {
        int n = buf.limit();
        int g = target.granularity();
        java.lang.foreign.MemorySegment seg = java.lang.foreign.MemorySegment.ofBuffer(buf.duplicate().position(0));
        int[] runs = new int[2 * ((n + g - 1) / g / 2 + 1)];
        int nRuns = 0;
        int runStart = -1;
        for (int off = 0; off < n; off += g) {
            int blk = Math.min(g, n - off);
            boolean zero = isZero(seg, off, blk);
            if (!zero && runStart < 0) {
                runStart = off;
            } else if (zero && runStart >= 0) {
                runs[2 * nRuns] = runStart;
                runs[2 * nRuns++ + 1] = off;
                runStart = -1;
            }
        }
        if (runStart >= 0) {
            runs[2 * nRuns] = runStart;
            runs[2 * nRuns++ + 1] = n;
        }
        if (nRuns > 0) {
            target.writeRuns(buf, pos, runs, nRuns);
        }
    }

    /** Whether {@code seg[off, off + len)} is all zeros, compared 4 KiB at a time against a zero block. */
    private static boolean isZero(java.lang.foreign.MemorySegment seg, int off, int len) {
        for (int o = off; o < off + len; o += SPARSE) {
            int n = Math.min(SPARSE, off + len - o);
            if (java.lang.foreign.MemorySegment.mismatch(seg, o, o + n, ZERO_SEGMENT, 0, n) >= 0) {
                return false;
            }
        }
        return true;
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
