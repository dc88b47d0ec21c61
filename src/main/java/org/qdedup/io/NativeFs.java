package org.qdedup.io;

import java.io.IOException;
import java.lang.foreign.Arena;
import java.lang.foreign.FunctionDescriptor;
import java.lang.foreign.Linker;
import java.lang.foreign.MemoryLayout;
import java.lang.foreign.MemorySegment;
import java.lang.foreign.StructLayout;
import java.lang.foreign.ValueLayout;
import java.lang.invoke.MethodHandle;
import java.lang.invoke.VarHandle;
import java.nio.file.Path;

/**
 * The few file system calls the JDK lacks, through {@code java.lang.foreign}: SEEK_DATA/SEEK_HOLE, st_blocks, hole
 * punching, QEMU's lock bytes, write-back and readahead hints, page-cache residency (cachestat) and fsync. Linux on
 * x86_64 and aarch64 only; elsewhere the methods report "all data" and "not supported".
 */
public final class NativeFs {
    private static final int O_RDONLY = 0;
    private static final int O_RDWR = 2;
    private static final int O_CLOEXEC = 0x80000;
    private static final int SEEK_DATA = 3;
    private static final int SEEK_HOLE = 4;
    private static final int ENXIO = 6;
    private static final int FALLOC_FL_KEEP_SIZE = 1;
    private static final int FALLOC_FL_PUNCH_HOLE = 2;
    /** st_blocks sits at byte 64 of struct stat on both x86_64 and aarch64 Linux. */
    private static final long ST_BLOCKS_OFFSET = 64;
    private static final long STAT_SIZE = 256;

    /**
     * libc's syscall(2) wrapper, the one downcall every call here goes through: the JDK spins a stub per call shape,
     * about 4 ms each at start-up, so one shape instead of one per function saves tens of milliseconds per command.
     */
    private static final MethodHandle SYSCALL;
    private static final StructLayout CAPTURE = Linker.Option.captureStateLayout();
    private static final VarHandle ERRNO = CAPTURE.varHandle(MemoryLayout.PathElement.groupElement("errno"));
    /**
     * Where each thread's calls leave errno: one segment per thread, where a confined arena per call cost a malloc,
     * a free and four objects on every call (every dedup confirmation is a pread, under the metadata lock).
     */
    private static final ThreadLocal<MemorySegment> CALL_STATE = ThreadLocal.withInitial(() -> Arena.ofAuto().allocate(CAPTURE));
    private static final boolean AVAILABLE;
    /** System call numbers: x86_64 and aarch64 (asm-generic); cachestat is 451 on both (Linux 6.5 and later). */
    private static final long SYS_OPENAT, SYS_CLOSE, SYS_LSEEK, SYS_FSTAT, SYS_FALLOCATE, SYS_FCNTL, SYS_SYNC_FILE_RANGE,
            SYS_FSYNC, SYS_PREAD64, SYS_FADVISE64, SYS_CACHESTAT = 451;
    private static final int POSIX_FADV_RANDOM = 1;
    /** struct cachestat_range (off, len) then struct cachestat (nr_cache, nr_dirty, ...: five u64), per thread. */
    private static final ThreadLocal<MemorySegment> CACHESTAT = ThreadLocal.withInitial(() -> Arena.ofAuto().allocate(16 + 40, 8));
    private static final long AT_FDCWD = -100;
    private static final int F_OFD_GETLK = 36;
    private static final int F_OFD_SETLK = 37;
    private static final short F_RDLCK = 0, F_WRLCK = 1, F_UNLCK = 2;
    private static final int EAGAIN = 11, EACCES = 13, EINTR = 4;
    private static final int SYNC_FILE_RANGE_WRITE = 2;
    /** struct flock on 64-bit Linux: l_type, l_whence (shorts), l_start, l_len, l_pid; 32 bytes. */
    private static final long FLOCK_SIZE = 32;

    static {
        String arch = System.getProperty("os.arch", "");
        boolean x86 = arch.equals("amd64") || arch.equals("x86_64");
        boolean arm = arch.equals("aarch64");
        SYS_OPENAT = x86 ? 257 : 56;
        SYS_CLOSE = x86 ? 3 : 57;
        SYS_LSEEK = x86 ? 8 : 62;
        SYS_FSTAT = x86 ? 5 : 80;
        SYS_FALLOCATE = x86 ? 285 : 47;
        SYS_FCNTL = x86 ? 72 : 25;
        SYS_SYNC_FILE_RANGE = x86 ? 277 : 84;
        SYS_FSYNC = x86 ? 74 : 82;
        SYS_PREAD64 = x86 ? 17 : 67;
        SYS_FADVISE64 = x86 ? 221 : 223;
        MethodHandle syscall = null;
        boolean ok = false;
        try {
            if (System.getProperty("os.name", "").toLowerCase().contains("linux") && (x86 || arm)) {
                Linker linker = Linker.nativeLinker();
                syscall = linker.downcallHandle(linker.defaultLookup().find("syscall").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_LONG, ValueLayout.JAVA_LONG, ValueLayout.JAVA_LONG,
                                ValueLayout.JAVA_LONG, ValueLayout.JAVA_LONG, ValueLayout.JAVA_LONG),
                        Linker.Option.captureCallState("errno"), Linker.Option.firstVariadicArg(1));
                ok = true;
            }
        } catch (Throwable t) {
            ok = false;
        }
        SYSCALL = syscall;
        AVAILABLE = ok;
    }

    /** One system call with up to four arguments, again while interrupted; returns its result, or -errno. */
    private static long sys(long nr, long a, long b, long c, long d) throws Throwable {
        MemorySegment state = CALL_STATE.get();
        long r;
        do {
            r = (long) SYSCALL.invokeExact(state, nr, a, b, c, d);
            r = r == -1 ? -(int) ERRNO.get(state, 0L) : r;
        } while (r == -EINTR);
        return r;
    }

    private NativeFs() {
    }

    public static boolean available() {
        return AVAILABLE;
    }

    /** A native descriptor of one file, kept beside its FileChannel for the calls the JDK lacks. */
    public static final class Fd implements AutoCloseable {
        private final int fd;
        private final String name;

        private Fd(int fd, String name) {
            this.fd = fd;
            this.name = name;
        }

        /** SEEK_DATA: first data offset at or after pos, or -1 when only a hole follows. */
        public long seekData(long pos) throws IOException {
            return seek(pos, SEEK_DATA);
        }

        /** SEEK_HOLE: first hole offset at or after pos (end of file counts), or -1 past the end. */
        public long seekHole(long pos) throws IOException {
            return seek(pos, SEEK_HOLE);
        }

        private long seek(long pos, int whence) throws IOException {
            long r = call("lseek", SYS_LSEEK, fd, pos, whence, 0);
            if (r >= 0) {
                return r;
            }
            if (r == -ENXIO) {
                return -1;
            }
            throw new IOException(name + ": lseek(" + pos + ", " + (whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE")
                    + ") failed: errno " + -r);
        }

        /** st_blocks * 512: the bytes the file system allocated for the file. */
        public long allocatedBytes() throws IOException {
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment st = arena.allocate(STAT_SIZE, 8);
                long r = call("fstat", SYS_FSTAT, fd, st.address(), 0, 0);
                if (r != 0) {
                    throw new IOException(name + ": fstat failed: errno " + -r);
                }
                return st.get(ValueLayout.JAVA_LONG, ST_BLOCKS_OFFSET) * 512;
            }
        }

        /**
         * Gives a range back to the file system (fallocate PUNCH_HOLE | KEEP_SIZE); it then reads as zeros.
         *
         * @return false when the file system does not support it
         */
        public boolean punchHole(long offset, long length) throws IOException {
            long r = call("fallocate", SYS_FALLOCATE, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
            if (r == 0) {
                return true;
            }
            if (r == -95 /* EOPNOTSUPP */ || r == -38 /* ENOSYS */) {
                return false;
            }
            throw new IOException(name + ": fallocate(PUNCH_HOLE, " + offset + ", " + length + ") failed: errno " + -r);
        }

        /**
         * Starts write-back of the dirty pages in a range without waiting for it (sync_file_range
         * SYNC_FILE_RANGE_WRITE; length 0 means to the end of the file). A hint only: durability still comes from
         * fsync, which also reports any error this write-back meets.
         */
        public void startWriteback(long offset, long length) {
            try {
                call("sync_file_range", SYS_SYNC_FILE_RANGE, fd, offset, length, SYNC_FILE_RANGE_WRITE);
            } catch (IOException e) {
                // a hint: the final fsync does the real work
            }
        }

        /**
         * Pages of {@code [offset, offset + length)} in the page cache, found without touching them or starting any
         * I/O (cachestat(2)), or -1 where the kernel lacks the call (before Linux 6.5) or refuses it.
         */
        public long cachedPages(long offset, long length) {
            MemorySegment m = CACHESTAT.get();
            m.set(ValueLayout.JAVA_LONG, 0, offset);
            m.set(ValueLayout.JAVA_LONG, 8, length);
            try {
                long r = sys(SYS_CACHESTAT, fd, m.address(), m.address() + 16, 0);
                return r == 0 ? m.get(ValueLayout.JAVA_LONG, 16) : -1;
            } catch (Throwable t) {
                return -1;
            }
        }

        /**
         * Tells the kernel that reads through this descriptor are random (posix_fadvise POSIX_FADV_RANDOM): no
         * readahead. A hint; ignored where refused.
         */
        public void adviseRandom() {
            try {
                sys(SYS_FADVISE64, fd, 0, 0, POSIX_FADV_RANDOM);
            } catch (Throwable t) {
                // a hint only
            }
        }

        /** pread(2) into native memory: the bytes read, fewer only at the end of the file. */
        public long pread(MemorySegment into, long pos) throws IOException {
            long done = 0;
            while (done < into.byteSize()) {
                long r = call("pread", SYS_PREAD64, fd, into.address() + done, into.byteSize() - done, pos + done);
                if (r < 0) {
                    throw new IOException(name + ": pread(" + (pos + done) + ") failed: errno " + -r);
                }
                if (r == 0) {
                    break;
                }
                done += r;
            }
            return done;
        }

        /**
         * fsync(2). The descriptor is the file's own open, so this flushes the same pages a FileChannel.force would
         * and reports write-back errors met since the open; FileChannel.force would also load a JFR event class from
         * the JDK's module image on its first call, a cold read at every command's start.
         */
        public void fsync() throws IOException {
            long r = call("fsync", SYS_FSYNC, fd, 0, 0, 0);
            if (r != 0) {
                throw new IOException(name + ": fsync failed: errno " + -r);
            }
        }

        /**
         * Takes a shared open-file-description lock on one byte, the kind QEMU uses for its permission bytes.
         *
         * @return false when another open file holds an exclusive lock there
         */
        public boolean lockByte(long offset) throws IOException {
            return fcntlByte(F_OFD_SETLK, F_RDLCK, offset) == 0;
        }

        /** Whether another open file description holds any lock on the byte (F_OFD_GETLK with a write lock). */
        public boolean byteLockedByOthers(long offset) throws IOException {
            return fcntlByte(F_OFD_GETLK, F_WRLCK, offset) != F_UNLCK;
        }

        /** Runs fcntl on one byte; SETLK returns 0 or -1 (conflict), GETLK the type of the conflicting lock. */
        private int fcntlByte(int cmd, short type, long offset) throws IOException {
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment fl = arena.allocate(FLOCK_SIZE, 8);
                fl.set(ValueLayout.JAVA_SHORT, 0, type);
                fl.set(ValueLayout.JAVA_SHORT, 2, (short) 0); // SEEK_SET
                fl.set(ValueLayout.JAVA_LONG, 8, offset);
                fl.set(ValueLayout.JAVA_LONG, 16, 1L);
                long r = call("fcntl", SYS_FCNTL, fd, cmd, fl.address(), 0);
                if (r != 0) {
                    if (cmd == F_OFD_SETLK && (r == -EAGAIN || r == -EACCES)) {
                        return -1;
                    }
                    throw new IOException(name + ": fcntl(" + (cmd == F_OFD_SETLK ? "F_OFD_SETLK" : "F_OFD_GETLK")
                            + ", byte " + offset + ") failed: errno " + -r);
                }
                return cmd == F_OFD_GETLK ? fl.get(ValueLayout.JAVA_SHORT, 0) : 0;
            }
        }

        private long call(String what, long nr, long a, long b, long c, long d) throws IOException {
            try {
                return sys(nr, a, b, c, d);
            } catch (Throwable t) {
                throw new IOException(name + ": " + what + " failed: " + t, t);
            }
        }

        @Override
        public void close() {
            try {
                sys(SYS_CLOSE, fd, 0, 0, 0);
            } catch (Throwable ignored) {
                // closing a read-side descriptor cannot lose data
            }
        }
    }

    /** Opens a native descriptor, or returns null where the calls are unavailable. */
    public static Fd open(Path path, boolean write) throws IOException {
        if (!AVAILABLE) {
            return null;
        }
        try (Arena arena = Arena.ofConfined()) {
            MemorySegment p = arena.allocateFrom(path.toString());
            long fd = sys(SYS_OPENAT, AT_FDCWD, p.address(), (write ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0);
            if (fd < 0) {
                throw new IOException(path + ": open failed: errno " + -fd);
            }
            return new Fd((int) fd, path.toString());
        } catch (IOException e) {
            throw e;
        } catch (Throwable t) {
            throw new IOException(path + ": open failed: " + t, t);
        }
    }
}
