package org.qdedup.io;

import java.io.IOException;
import java.lang.foreign.Arena;
import java.lang.foreign.FunctionDescriptor;
import java.lang.foreign.Linker;
import java.lang.foreign.MemoryLayout;
import java.lang.foreign.MemorySegment;
import java.lang.foreign.StructLayout;
import java.lang.foreign.SymbolLookup;
import java.lang.foreign.ValueLayout;
import java.lang.invoke.MethodHandle;
import java.lang.invoke.VarHandle;
import java.nio.file.Path;

/**
 * The few file system calls the JDK lacks, through {@code java.lang.foreign}: SEEK_DATA/SEEK_HOLE, st_blocks,
 * and hole punching. Linux only; where a call is unavailable the methods report "all data" and "not supported".
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

    private static final MethodHandle OPEN, CLOSE, LSEEK, FSTAT, FALLOCATE, FCNTL, SYNC_FILE_RANGE, FSYNC;
    private static final StructLayout CAPTURE = Linker.Option.captureStateLayout();
    private static final VarHandle ERRNO = CAPTURE.varHandle(MemoryLayout.PathElement.groupElement("errno"));
    private static final boolean AVAILABLE;
    private static final int F_OFD_GETLK = 36;
    private static final int F_OFD_SETLK = 37;
    private static final short F_RDLCK = 0, F_WRLCK = 1, F_UNLCK = 2;
    private static final int EAGAIN = 11, EACCES = 13;
    private static final int SYNC_FILE_RANGE_WRITE = 2;
    /** struct flock on 64-bit Linux: l_type, l_whence (shorts), l_start, l_len, l_pid; 32 bytes. */
    private static final long FLOCK_SIZE = 32;

    static {
        MethodHandle open = null, close = null, lseek = null, fstat = null, fallocate = null, fcntl = null, syncRange = null,
                fsync = null;
        boolean ok = false;
        try {
            if (System.getProperty("os.name", "").toLowerCase().contains("linux")) {
                Linker linker = Linker.nativeLinker();
                SymbolLookup libc = linker.defaultLookup();
                Linker.Option errno = Linker.Option.captureCallState("errno");
                open = linker.downcallHandle(libc.find("open").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.ADDRESS, ValueLayout.JAVA_INT),
                        errno, Linker.Option.firstVariadicArg(2));
                close = linker.downcallHandle(libc.find("close").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.JAVA_INT));
                lseek = linker.downcallHandle(libc.find("lseek").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_LONG, ValueLayout.JAVA_INT, ValueLayout.JAVA_LONG, ValueLayout.JAVA_INT), errno);
                fstat = linker.downcallHandle(libc.find("fstat").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.JAVA_INT, ValueLayout.ADDRESS), errno);
                fallocate = linker.downcallHandle(libc.find("fallocate").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.JAVA_INT, ValueLayout.JAVA_INT,
                                ValueLayout.JAVA_LONG, ValueLayout.JAVA_LONG), errno);
                fcntl = linker.downcallHandle(libc.find("fcntl").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.JAVA_INT, ValueLayout.JAVA_INT, ValueLayout.ADDRESS),
                        errno, Linker.Option.firstVariadicArg(2));
                syncRange = linker.downcallHandle(libc.find("sync_file_range").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.JAVA_INT, ValueLayout.JAVA_LONG,
                                ValueLayout.JAVA_LONG, ValueLayout.JAVA_INT));
                fsync = linker.downcallHandle(libc.find("fsync").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.JAVA_INT), errno);
                ok = true;
            }
        } catch (Throwable t) {
            ok = false;
        }
        OPEN = open;
        CLOSE = close;
        LSEEK = lseek;
        FSTAT = fstat;
        FALLOCATE = fallocate;
        FCNTL = fcntl;
        SYNC_FILE_RANGE = syncRange;
        FSYNC = fsync;
        AVAILABLE = ok;
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
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment state = arena.allocate(CAPTURE);
                long r = (long) LSEEK.invokeExact(state, fd, pos, whence);
                if (r >= 0) {
                    return r;
                }
                int err = (int) ERRNO.get(state, 0L);
                if (err == ENXIO) {
                    return -1;
                }
                throw new IOException(name + ": lseek(" + pos + ", " + (whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE")
                        + ") failed: errno " + err);
            } catch (IOException e) {
                throw e;
            } catch (Throwable t) {
                throw new IOException(name + ": lseek failed: " + t, t);
            }
        }

        /** st_blocks * 512: the bytes the file system allocated for the file. */
        public long allocatedBytes() throws IOException {
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment state = arena.allocate(CAPTURE);
                MemorySegment st = arena.allocate(STAT_SIZE, 8);
                int r = (int) FSTAT.invokeExact(state, fd, st);
                if (r != 0) {
                    throw new IOException(name + ": fstat failed: errno " + (int) ERRNO.get(state, 0L));
                }
                return st.get(ValueLayout.JAVA_LONG, ST_BLOCKS_OFFSET) * 512;
            } catch (IOException e) {
                throw e;
            } catch (Throwable t) {
                throw new IOException(name + ": fstat failed: " + t, t);
            }
        }

        /**
         * Gives a range back to the file system (fallocate PUNCH_HOLE | KEEP_SIZE); it then reads as zeros.
         *
         * @return false when the file system does not support it
         */
        public boolean punchHole(long offset, long length) throws IOException {
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment state = arena.allocate(CAPTURE);
                int r = (int) FALLOCATE.invokeExact(state, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
                if (r == 0) {
                    return true;
                }
                int err = (int) ERRNO.get(state, 0L);
                if (err == 95 /* EOPNOTSUPP */ || err == 38 /* ENOSYS */) {
                    return false;
                }
                throw new IOException(name + ": fallocate(PUNCH_HOLE, " + offset + ", " + length + ") failed: errno " + err);
            } catch (IOException e) {
                throw e;
            } catch (Throwable t) {
                throw new IOException(name + ": fallocate failed: " + t, t);
            }
        }

        /**
         * Starts write-back of the dirty pages in a range without waiting for it (sync_file_range
         * SYNC_FILE_RANGE_WRITE; length 0 means to the end of the file). A hint only: durability still comes from
         * fsync, which also reports any error this write-back meets.
         */
        public void startWriteback(long offset, long length) {
            try {
                int ignored = (int) SYNC_FILE_RANGE.invokeExact(fd, offset, length, SYNC_FILE_RANGE_WRITE);
            } catch (Throwable t) {
                // a hint: the final fsync does the real work
            }
        }

        /**
         * fsync(2). The descriptor is the file's own open, so this flushes the same pages a FileChannel.force would
         * and reports write-back errors met since the open; FileChannel.force would also load a JFR event class from
         * the JDK's module image on its first call, a cold read at every command's start.
         */
        public void fsync() throws IOException {
            int r, err;
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment state = arena.allocate(CAPTURE);
                r = (int) FSYNC.invokeExact(state, fd);
                err = r == 0 ? 0 : (int) ERRNO.get(state, 0L);
            } catch (Throwable t) {
                throw new IOException(name + ": fsync failed: " + t, t);
            }
            if (r != 0) {
                throw new IOException(name + ": fsync failed: errno " + err);
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
                MemorySegment state = arena.allocate(CAPTURE);
                MemorySegment fl = arena.allocate(FLOCK_SIZE, 8);
                fl.set(ValueLayout.JAVA_SHORT, 0, type);
                fl.set(ValueLayout.JAVA_SHORT, 2, (short) 0); // SEEK_SET
                fl.set(ValueLayout.JAVA_LONG, 8, offset);
                fl.set(ValueLayout.JAVA_LONG, 16, 1L);
                int r = (int) FCNTL.invokeExact(state, fd, cmd, fl);
                if (r != 0) {
                    int err = (int) ERRNO.get(state, 0L);
                    if (cmd == F_OFD_SETLK && (err == EAGAIN || err == EACCES)) {
                        return -1;
                    }
                    throw new IOException(name + ": fcntl(" + (cmd == F_OFD_SETLK ? "F_OFD_SETLK" : "F_OFD_GETLK")
                            + ", byte " + offset + ") failed: errno " + err);
                }
                return cmd == F_OFD_GETLK ? fl.get(ValueLayout.JAVA_SHORT, 0) : 0;
            } catch (IOException e) {
                throw e;
            } catch (Throwable t) {
                throw new IOException(name + ": fcntl failed: " + t, t);
            }
        }

        @Override
        public void close() {
            try {
                int r = (int) CLOSE.invokeExact(fd);
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
            MemorySegment state = arena.allocate(CAPTURE);
            MemorySegment p = arena.allocateFrom(path.toString());
            int fd = (int) OPEN.invokeExact(state, p, (write ? O_RDWR : O_RDONLY) | O_CLOEXEC);
            if (fd < 0) {
                throw new IOException(path + ": open failed: errno " + (int) ERRNO.get(state, 0L));
            }
            return new Fd(fd, path.toString());
        } catch (IOException e) {
            throw e;
        } catch (Throwable t) {
            throw new IOException(path + ": open failed: " + t, t);
        }
    }
}
