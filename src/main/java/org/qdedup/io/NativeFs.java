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

    private static final MethodHandle OPEN, CLOSE, LSEEK, FSTAT, FALLOCATE, FCNTL;
    private static final StructLayout CAPTURE = Linker.Option.captureStateLayout();
    private static final VarHandle ERRNO = CAPTURE.varHandle(MemoryLayout.PathElement.groupElement("errno"));
    private static final boolean AVAILABLE;
    private static final int F_OFD_SETLK = 37;
    private static final short F_RDLCK = 0, F_WRLCK = 1, F_UNLCK = 2;
    private static final int EAGAIN = 11, EACCES = 13;
    /** struct flock on 64-bit Linux: l_type, l_whence (shorts), l_start, l_len, l_pid; 32 bytes. */
    private static final long FLOCK_SIZE = 32;

    static {
        MethodHandle open = null, close = null, lseek = null, fstat = null, fallocate = null, fcntl = null;
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
         * Takes (or, with {@code mode} 0, drops) an open-file-description lock on the whole file, the kind QEMU
         * uses, so QEMU and qdedup see each other's locks; shared for readers, exclusive for writers.
         *
         * @param mode 1 shared, 2 exclusive, 0 unlock
         * @return false when another process holds a conflicting lock
         */
        public boolean lock(int mode) throws IOException {
            try (Arena arena = Arena.ofConfined()) {
                MemorySegment state = arena.allocate(CAPTURE);
                MemorySegment fl = arena.allocate(FLOCK_SIZE, 8);
                fl.set(ValueLayout.JAVA_SHORT, 0, mode == 0 ? F_UNLCK : mode == 1 ? F_RDLCK : F_WRLCK);
                fl.set(ValueLayout.JAVA_SHORT, 2, (short) 0); // SEEK_SET
                fl.set(ValueLayout.JAVA_LONG, 8, 0L);
                fl.set(ValueLayout.JAVA_LONG, 16, 0L); // to the end of the file and beyond
                int r = (int) FCNTL.invokeExact(state, fd, F_OFD_SETLK, fl);
                if (r == 0) {
                    return true;
                }
                int err = (int) ERRNO.get(state, 0L);
                if (err == EAGAIN || err == EACCES) {
                    return false;
                }
                throw new IOException(name + ": fcntl(F_OFD_SETLK) failed: errno " + err);
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
