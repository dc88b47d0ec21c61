package org.qdedup.io;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.EnumSet;
import java.util.List;
import java.util.Set;

/**
 * A file layer that fails the N-th write, flush, truncate or punch-hole of the file it wraps with an IOException
 * carrying ENOSPC or EIO, the way the JDK reports them ("No space left on device", "Input/output error"). Once (a
 * transient EIO) or persistently until {@link #lift()} (a full disk). A failing call changes nothing in the file
 * below. For the H2-style fault tests: count the calls of a workload, then fail each one in turn.
 */
public final class FaultyFile extends ForwardingBlockFile {
    /** The operations that can fail. */
    public enum Op { WRITE, FLUSH, TRUNCATE, PUNCH_HOLE }

    /** The errors, with the JDK's messages for them (strerror). */
    public enum Errno {
        ENOSPC("No space left on device"), EIO("Input/output error");

        public final String message;

        Errno(String message) {
            this.message = message;
        }
    }

    private final List<Op> trace = new ArrayList<>();
    private long failAt = -1;
    private Set<Op> kinds = EnumSet.noneOf(Op.class);
    private Errno errno;
    private boolean persistent;
    private boolean tripped;
    private boolean failing;
    private int failures;
    private long seen;
    private Op firstFailed;
    private long firstFailedPos;

    public FaultyFile(BlockFile inner) {
        super(inner);
    }

    /**
     * From now on the {@code n}-th (1-based) call of one of {@code ops} fails with {@code e}; with {@code persistent}
     * every later call of those kinds fails too, until {@link #lift()}. Calls are counted from this arming.
     */
    public synchronized void failAt(long n, Errno e, boolean persistent, Set<Op> ops) {
        this.failAt = n;
        this.errno = e;
        this.persistent = persistent;
        this.kinds = EnumSet.copyOf(ops);
        this.tripped = false;
        this.failing = false;
        this.failures = 0;
        this.seen = 0;
        this.firstFailed = null;
        trace.clear();
    }

    private Op hookOn;
    private Runnable hook;

    /** Runs {@code action} once, inside the next call of kind {@code op} (before it reaches the file): for races. */
    public synchronized void beforeNext(Op op, Runnable action) {
        hookOn = op;
        hook = action;
    }

    /** Space is back (or the device recovered): nothing fails any more. */
    public synchronized void lift() {
        failing = false;
        failAt = -1;
    }

    /** Whether the armed fault has fired. */
    public synchronized boolean tripped() {
        return tripped;
    }

    /** The kind of the call the armed fault failed first (null before it fired). */
    public synchronized Op firstFailed() {
        return firstFailed;
    }

    /** The file position of the first failed call (writes; 0 for the other kinds). */
    public synchronized long firstFailedPos() {
        return firstFailedPos;
    }

    /** How many calls failed since arming. */
    public synchronized int failures() {
        return failures;
    }

    /** The operations seen since arming (all kinds, failed ones included), for counting fault points. */
    public synchronized List<Op> trace() {
        return List.copyOf(trace);
    }

    /** Counts the call; throws when it is the one to fail (or the disk is still full). */
    private void maybeFail(Op op, long pos, boolean canFail) throws IOException {
        Runnable h;
        synchronized (this) {
            h = op == hookOn ? hook : null;
            if (h != null) {
                hook = null;
                hookOn = null;
            }
        }
        if (h != null) {
            h.run();
        }
        count(op, pos, canFail);
    }

    private synchronized void count(Op op, long pos, boolean canFail) throws IOException {
        trace.add(op);
        if (!kinds.contains(op)) {
            return;
        }
        if (++seen == failAt && canFail) {
            tripped = true;
            firstFailed = op;
            firstFailedPos = pos;
            failing = persistent;
        } else if (!failing || !canFail) {
            return;
        }
        failures++;
        throw new IOException(errno.message);
    }

    @Override
    public void write(ByteBuffer src, long pos) throws IOException {
        maybeFail(Op.WRITE, pos, true);
        inner.write(src, pos);
    }

    @Override
    public void flush() throws IOException {
        maybeFail(Op.FLUSH, 0, true);
        inner.flush();
    }

    @Override
    public void truncate(long size) throws IOException {
        // Only growing needs space: shrinking a file never fails with a full disk.
        maybeFail(Op.TRUNCATE, size, size > inner.size() || errno != Errno.ENOSPC);
        inner.truncate(size);
    }

    @Override
    public boolean punchHole(long offset, long length) throws IOException {
        maybeFail(Op.PUNCH_HOLE, offset, true);
        return inner.punchHole(offset, length);
    }
}
