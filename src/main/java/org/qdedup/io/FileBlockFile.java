package org.qdedup.io;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.file.NoSuchFileException;
import java.nio.file.AccessDeniedException;
import java.nio.file.OpenOption;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;

/** A real host file: FileChannel for I/O, a native descriptor for extents, allocation and the QEMU-compatible lock. */
public final class FileBlockFile implements BlockFile {
    /** How an open treats the image lock. */
    public enum Lock { NONE, SHARED, EXCLUSIVE }

    private final String name;
    private final Path path;
    private final FileChannel channel;
    private final NativeFs.Fd fd;
    private final boolean writable;

    private FileBlockFile(String name, Path path, FileChannel channel, NativeFs.Fd fd, boolean writable) {
        this.name = name;
        this.path = path;
        this.channel = channel;
        this.fd = fd;
        this.writable = writable;
    }

    /**
     * Opens an existing file.
     *
     * @param name what messages call it (the path as the user wrote it)
     * @param lock NONE for {@code -U}; SHARED for read-only opens; EXCLUSIVE for writers
     */
    public static FileBlockFile open(String name, Path path, boolean writable, Lock lock) throws IOException {
        return open(name, path, writable, lock, false);
    }

    /**
     * Opens, or with {@code create} creates (truncating), a file. An existing file is truncated only once the lock
     * is held, so creating over an image in use elsewhere fails without touching it (as qemu-img create does).
     */
    public static FileBlockFile open(String name, Path path, boolean writable, Lock lock, boolean create) throws IOException {
        OpenOption[] opts = writable
                ? (create ? new OpenOption[]{StandardOpenOption.READ, StandardOpenOption.WRITE, StandardOpenOption.CREATE}
                : new OpenOption[]{StandardOpenOption.READ, StandardOpenOption.WRITE})
                : new OpenOption[]{StandardOpenOption.READ};
        FileChannel ch;
        try {
            ch = FileChannel.open(path, opts);
        } catch (NoSuchFileException e) {
            throw new IOException(name + ": no such file");
        } catch (AccessDeniedException e) {
            throw new IOException(name + ": permission denied");
        }
        NativeFs.Fd fd = null;
        try {
            fd = NativeFs.open(path, writable);
            if (fd != null && lock != Lock.NONE) {
                lockLikeQemu(name, fd, lock == Lock.EXCLUSIVE);
            }
            if (create && writable) {
                ch.truncate(0);
            }
            return new FileBlockFile(name, path, ch, fd, writable);
        } catch (IOException | RuntimeException e) {
            if (fd != null) {
                fd.close();
            }
            ch.close();
            throw e;
        }
    }

    /** QEMU's permission bits (block.h) and lock byte bases (file-posix.c). */
    private static final int PERM_CONSISTENT_READ = 0, PERM_WRITE = 1, PERM_RESIZE = 3;
    private static final String[] PERM_NAMES = {"consistent read", "write", "write unchanged", "resize"};
    private static final long LOCK_PERM_BASE = 100, LOCK_SHARED_BASE = 200;

    /**
     * Locks the bytes QEMU locks: a shared lock on 100+p for each permission p held, and on 200+p for each
     * permission others may not have. Readers hold consistent-read and refuse writers; writers also hold write
     * and resize. QEMU and qdedup then see each other exactly as two QEMU processes do.
     */
    private static void lockLikeQemu(String name, NativeFs.Fd fd, boolean write) throws IOException {
        int[] held = write ? new int[]{PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE} : new int[]{PERM_CONSISTENT_READ};
        int[] unshared = {PERM_WRITE, PERM_RESIZE};
        for (int p : held) {
            if (!fd.lockByte(LOCK_PERM_BASE + p)) {
                throw locked(name, "cannot lock byte " + (LOCK_PERM_BASE + p));
            }
        }
        for (int p : unshared) {
            if (!fd.lockByte(LOCK_SHARED_BASE + p)) {
                throw locked(name, "cannot lock byte " + (LOCK_SHARED_BASE + p));
            }
        }
        for (int p : held) {
            if (fd.byteLockedByOthers(LOCK_SHARED_BASE + p)) {
                throw locked(name, "another process does not share the '" + PERM_NAMES[p] + "' permission");
            }
        }
        for (int p : unshared) {
            if (fd.byteLockedByOthers(LOCK_PERM_BASE + p)) {
                throw locked(name, "another process has it open with the '" + PERM_NAMES[p] + "' permission");
            }
        }
    }

    private static IOException locked(String name, String why) {
        return new IOException(name + ": image is in use by another process (" + why + "); -U reads it without locking");
    }

    public Path path() {
        return path;
    }

    @Override
    public String name() {
        return name;
    }

    @Override
    public FileStamp stamp() throws IOException {
        java.util.Map<String, Object> a = java.nio.file.Files.readAttributes(path, "unix:size,ino,ctime,lastModifiedTime");
        return new FileStamp((Long) a.get("size"), (Long) a.get("ino"),
                ((java.nio.file.attribute.FileTime) a.get("ctime")).to(java.util.concurrent.TimeUnit.NANOSECONDS),
                ((java.nio.file.attribute.FileTime) a.get("lastModifiedTime")).to(java.util.concurrent.TimeUnit.NANOSECONDS));
    }

    @Override
    public Path location() {
        return path;
    }

    @Override
    public long size() throws IOException {
        return channel.size();
    }

    /**
     * Reads and writes at least this long may go around the page cache (see {@link #directReadsWhenUncached} and
     * {@link #directWritesWhenLarge}).
     */
    public static final int DIRECT_MIN = 256 << 10;
    private int directAlign;

    private volatile FileChannel directReadChannel;

    /**
     * For one-shot bulk readers (convert): when less than half of the file is in the page cache, large aligned reads
     * go to the disk directly (O_DIRECT) into the caller's buffer from now on. Such a read is copied once and never
     * again, so the page cache would only add a copy and fresh pages; on a VM whose free memory goes back to the host,
     * each fresh page also costs a fault on the host (see bench/README.md). The choice is made once for the whole file:
     * asked range by range, the kernel's readahead (8 MiB here) after small buffered reads (L2 tables) ran ahead of
     * the direct reads, made the next ranges "cached" and turned the rest of the file buffered. Small reads stay
     * buffered but without readahead (POSIX_FADV_RANDOM on qdedup's own descriptor). Kernels without cachestat(2) and
     * file systems without O_DIRECT read as before, and a failing direct read falls back; O_DIRECT reads see dirty
     * cached pages too (the kernel writes them back first).
     */
    public void directReadsWhenUncached() throws IOException {
        if (fd == null || directReadChannel != null) {
            return;
        }
        long size = channel.size();
        long cached = fd.cachedPages(0, size);
        if (cached >= 0 && cached * 2 < (size + Buffers.PAGE - 1) / Buffers.PAGE) {
            directReadChannel = openDirect(StandardOpenOption.READ);
            if (directReadChannel != null) {
                fd.adviseRandom();
            }
        }
    }

    /** A second channel on the file with O_DIRECT (and {@link #directAlign} set), or null where it cannot be had. */
    private FileChannel openDirect(StandardOpenOption mode) {
        try {
            int block = directBlockSize();
            if (block == 0) {
                return null;
            }
            directAlign = block;
            return FileChannel.open(path, mode, com.sun.nio.file.ExtendedOpenOption.DIRECT);
        } catch (IOException | UnsupportedOperationException e) {
            return null; // e.g. tmpfs refuses O_DIRECT: buffered I/O it is
        }
    }

    @Override
    public boolean readsAroundCache() {
        return directReadChannel != null;
    }

    /** Reads the aligned head of a large read with O_DIRECT; returns the bytes read that way (maybe 0). */
    private int readDirect(FileChannel direct, ByteBuffer dst, long pos) throws IOException {
        int align = directAlign;
        ByteBuffer part = directPart(dst, pos);
        if (part == null) {
            return 0;
        }
        int done = 0;
        try {
            while (part.hasRemaining()) {
                int n = direct.read(part, pos + done);
                if (n <= 0) {
                    break;
                }
                done += n;
                if ((done & (align - 1)) != 0) {
                    break; // the end of the file inside a block: the buffered read after this finds the end too
                }
            }
        } catch (IOException e) {
            // A file system may want other alignment than it reports: buffered reads from here on (and any real
            // error, such as EIO, is met again there).
            directReadChannel = null;
            direct.close();
        }
        dst.position(dst.position() + done);
        directBytesRead.addAndGet(done);
        return done;
    }

    private final java.util.concurrent.atomic.AtomicLong directBytesRead = new java.util.concurrent.atomic.AtomicLong();

    /** Bytes read with O_DIRECT so far (for tests). */
    long directBytesRead() {
        return directBytesRead.get();
    }

    private volatile FileChannel directWriteChannel;

    /**
     * For bulk writers that were asked to bypass the host cache (convert -t none): from now on, large aligned writes
     * go to the disk directly (O_DIRECT); the final {@link #flush} still makes them durable (fsync flushes the disk's
     * cache for direct writes too). Small and unaligned writes (metadata, cluster heads and tails) stay buffered; the
     * kernel keeps the two coherent, and no range is written both ways at once.
     */
    public void directWritesWhenLarge() {
        if (fd == null || !writable || directWriteChannel != null) {
            return;
        }
        directWriteChannel = openDirect(StandardOpenOption.WRITE);
    }

    /** The file system's block size, which O_DIRECT transfers must be aligned to, or 0 when it is not usable. */
    private int directBlockSize() throws IOException {
        long block = java.nio.file.Files.getFileStore(path).getBlockSize();
        return block < 512 || block > 65536 || Long.bitCount(block) != 1 ? 0 : (int) block;
    }

    /** The head of {@code b} that O_DIRECT can move at {@code pos} (whole blocks, aligned), or null if too small. */
    private ByteBuffer directPart(ByteBuffer b, long pos) {
        int align = directAlign;
        int len = b.remaining() & -align;
        if (len < DIRECT_MIN || (pos & (align - 1)) != 0
                || (java.lang.foreign.MemorySegment.ofBuffer(b).address() & (align - 1)) != 0) {
            return null;
        }
        return b.slice(b.position(), len);
    }

    /** Writes the aligned head of a large write with O_DIRECT; returns the bytes written that way (maybe 0). */
    private int writeDirect(FileChannel direct, ByteBuffer src, long pos) throws IOException {
        ByteBuffer part = directPart(src, pos);
        if (part == null) {
            return 0;
        }
        int done = 0;
        try {
            while (part.hasRemaining()) {
                done += direct.write(part, pos + done);
            }
        } catch (IOException e) {
            // A file system may want other alignment than it reports: the buffered path writes the rest (and meets
            // any real error, such as a full disk, again).
            directWriteChannel = null;
            direct.close();
        }
        src.position(src.position() + done);
        directBytes.addAndGet(done);
        return done;
    }

    private final java.util.concurrent.atomic.AtomicLong directBytes = new java.util.concurrent.atomic.AtomicLong();

    /** Bytes written with O_DIRECT so far (for tests). */
    long directBytesWritten() {
        return directBytes.get();
    }

    /** Per-thread native buffers for {@link #contentEquals}. */
    private static final ThreadLocal<java.lang.foreign.MemorySegment> COMPARE = new ThreadLocal<>();

    /**
     * Reads with pread(2) into native memory and compares there: dedup confirms every candidate cluster this way
     * under the metadata lock, where a FileChannel read into a heap array (bounce buffer, interruptible-channel
     * bookkeeping, a copy) cost twice as much.
     */
    @Override
    public boolean contentEquals(long pos, byte[] data, int off, int len) throws IOException {
        if (fd == null) {
            return BlockFile.super.contentEquals(pos, data, off, len);
        }
        java.lang.foreign.MemorySegment seg = COMPARE.get();
        if (seg == null || seg.byteSize() < len) {
            seg = java.lang.foreign.Arena.ofAuto().allocate(Math.max(len, 4096), 4096);
            COMPARE.set(seg);
        }
        java.lang.foreign.MemorySegment part = seg.asSlice(0, len);
        return fd.pread(part, pos) == len && java.lang.foreign.MemorySegment.mismatch(part, 0, len,
                java.lang.foreign.MemorySegment.ofArray(data), off, off + len) == -1;
    }

    @Override
    public int read(ByteBuffer dst, long pos) throws IOException {
        if (!dst.isDirect()) {
            return readViaBounce(dst, pos);
        }
        int total = 0;
        FileChannel direct = directReadChannel;
        if (direct != null) {
            if (dst.remaining() >= DIRECT_MIN) {
                total = readDirect(direct, dst, pos);
            }
            if (dst.hasRemaining()) {
                // Small and unaligned pieces (L2 tables, lone clusters) through the descriptor advised random: a
                // readahead of megabytes after each would read again what the direct reads fetch.
                long n = fd.pread(java.lang.foreign.MemorySegment.ofBuffer(dst), pos + total);
                dst.position(dst.position() + (int) n);
                total += (int) n;
            }
            return total;
        }
        while (dst.hasRemaining()) {
            int n = channel.read(dst, pos + total);
            if (n < 0) {
                break;
            }
            total += n;
        }
        return total;
    }

    @Override
    public void write(ByteBuffer src, long pos) throws IOException {
        if (!src.isDirect()) {
            writeViaBounce(src, pos);
            return;
        }
        long p = pos;
        FileChannel direct = directWriteChannel;
        if (direct != null && src.remaining() >= DIRECT_MIN) {
            p += writeDirect(direct, src, p);
        }
        while (src.hasRemaining()) {
            p += channel.write(src, p);
        }
        long every = writeBehindBytes;
        if (every > 0 && writtenSinceKick.addAndGet(p - pos) >= every) {
            writtenSinceKick.set(0);
            fd.startWriteback(0, 0);
        }
    }

    @Override
    public void transferTo(long pos, long len, java.nio.channels.WritableByteChannel target) throws IOException {
        for (long done = 0; done < len; ) {
            long n = channel.transferTo(pos + done, len - done, target); // sendfile(2) to a socket
            if (n <= 0) {
                if (pos + done >= channel.size()) {
                    throw new java.io.EOFException(name + ": end of file at " + (pos + done) + " while sending " + len + " bytes from " + pos);
                }
                continue;
            }
            done += n;
        }
    }

    private volatile long writeBehindBytes;
    private final java.util.concurrent.atomic.AtomicLong writtenSinceKick = new java.util.concurrent.atomic.AtomicLong();

    /**
     * For bulk writers that flush at the end: after every {@code everyBytes} written, starts the kernel's write-back
     * of the file's dirty pages, so that the disk works during the copy and the final fsync finds little left to do.
     * 0 turns it off.
     */
    public void writeBehind(long everyBytes) {
        writeBehindBytes = fd == null ? 0 : everyBytes;
    }

    // Heap buffers would go through the JDK's own unaligned temporary buffers; ours are page-aligned (see Buffers).
    private int readViaBounce(ByteBuffer dst, long pos) throws IOException {
        int total = 0;
        while (dst.hasRemaining()) {
            ByteBuffer b = Buffers.bounce(dst.remaining());
            b.limit(Math.min(b.capacity(), dst.remaining()));
            int want = b.remaining();
            int got = read(b, pos + total);
            dst.put(b.flip());
            total += got;
            if (got < want) {
                break;
            }
        }
        return total;
    }

    private void writeViaBounce(ByteBuffer src, long pos) throws IOException {
        long p = pos;
        while (src.hasRemaining()) {
            ByteBuffer b = Buffers.bounce(src.remaining());
            int n = Math.min(b.capacity(), src.remaining());
            b.put(src.slice(src.position(), n)).flip();
            src.position(src.position() + n);
            write(b, p);
            p += n;
        }
    }

    private volatile boolean syncDisabled;

    /** Cache mode "unsafe" (qemu-img convert's default): flush requests are ignored. */
    public void disableSync(boolean disabled) {
        this.syncDisabled = disabled;
    }

    @Override
    public void flush() throws IOException {
        if (!syncDisabled) {
            if (fd != null) {
                fd.fsync();
            } else {
                channel.force(true);
            }
        }
    }

    @Override
    public void truncate(long newSize) throws IOException {
        long cur = channel.size();
        if (newSize < cur) {
            channel.truncate(newSize);
        } else if (newSize > cur) {
            // FileChannel cannot grow a file by truncate: write one byte at the end, keeping it sparse.
            channel.write(ByteBuffer.allocate(1), newSize - 1);
        }
    }

    @Override
    public long nextData(long pos) throws IOException {
        if (fd == null) {
            return BlockFile.super.nextData(pos);
        }
        return fd.seekData(pos);
    }

    @Override
    public long nextHole(long pos) throws IOException {
        if (fd == null) {
            return BlockFile.super.nextHole(pos);
        }
        long h = fd.seekHole(pos);
        return h < 0 ? Math.max(pos, size()) : h;
    }

    @Override
    public long allocatedBytes() throws IOException {
        return fd == null ? size() : fd.allocatedBytes();
    }

    @Override
    public boolean punchHole(long offset, long length) throws IOException {
        return writable && fd != null && fd.punchHole(offset, length);
    }

    @Override
    public void close() throws IOException {
        FileChannel direct = directWriteChannel, directRead = directReadChannel;
        try (FileChannel c = channel; FileChannel d = direct; FileChannel r = directRead) {
            // all closed, the data channel first
        } finally {
            if (fd != null) {
                fd.close();
            }
        }
    }
}
