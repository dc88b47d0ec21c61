package org.qdedup.nbd;

import static org.qdedup.nbd.NbdProtocol.*;

import java.io.EOFException;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.ClosedChannelException;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.ReentrantLock;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ChainStatus;
import org.qdedup.image.WritableDevice;

/**
 * Serves one image over NBD (fixed newstyle handshake, structured replies, base:allocation): the export handler.
 * Each connection reads requests in order; plain WRITEs run one after the other on the connection's own thread,
 * the other requests concurrently on a pool, and each is answered as it completes; replies of one connection are
 * written one at a time. Bad input from a client ends that client's connection, never the
 * server, and never reaches the image unchecked.
 */
public final class NbdServer implements AutoCloseable {
    /** Largest READ or WRITE payload accepted. */
    public static final int MAX_PAYLOAD = 32 << 20;
    /** Largest option payload in the handshake. */
    static final int MAX_OPTION = 64 << 10;
    /** Socket send buffer asked for on unix sockets (the kernel caps it at net.core.wmem_max). */
    static final int SEND_BUFFER = 4 << 20;
    /** Requests in flight per connection before the reader waits. */
    static final int MAX_IN_FLIGHT = 64;

    /** Counters for --metrics. */
    public static final class Counters {
        public final AtomicLong reads = new AtomicLong(), writes = new AtomicLong(), flushes = new AtomicLong(),
                trims = new AtomicLong(), zeroWrites = new AtomicLong();
    }

    private final BlockDevice image;
    private final WritableDevice writable;
    private final String exportName;
    private final int maxClients;
    private final Counters counters = new Counters();
    private final ServerSocketChannel listener;
    private final Set<SocketChannel> clients = ConcurrentHashMap.newKeySet();
    /**
     * One platform thread per connection: it reads requests with plain blocking reads (a virtual thread would park
     * and be woken through the JDK's poller and a carrier thread: three thread hand-offs per request) and runs
     * plain WRITEs itself (see {@link Connection#transmit}).
     */
    private final ExecutorService threads = Executors.newThreadPerTaskExecutor(
            Thread.ofPlatform().daemon().name("nbd-conn-", 0).factory());
    /**
     * The other requests run on pooled platform threads: their per-thread I/O buffers (ours and the JDK's) are
     * reused from one request to the next, where a fresh virtual thread per request would allocate them every time.
     * The pool grows as needed: a client that stops taking its replies blocks the threads sending to it (at most
     * {@link #MAX_IN_FLIGHT}), never the ones other clients need.
     */
    private final ExecutorService workers = Executors.newCachedThreadPool(r -> {
        Thread t = new Thread(r, "nbd-worker");
        t.setDaemon(true);
        return t;
    });
    private final Semaphore clientSlots;
    private volatile boolean closing;

    /**
     * @param image      the device to export; written to when it is a {@link WritableDevice} and not read-only
     * @param maxClients clients served at once, 0 for any number
     */
    public NbdServer(BlockDevice image, boolean readOnly, String exportName, int maxClients, ServerSocketChannel listener) {
        this.image = image;
        this.writable = !readOnly && image instanceof WritableDevice w ? w : null;
        this.exportName = exportName;
        this.maxClients = maxClients;
        this.listener = listener;
        this.clientSlots = new Semaphore(maxClients > 0 ? maxClients : Integer.MAX_VALUE);
    }

    public Counters counters() {
        return counters;
    }

    /** Accepts clients until {@link #close()}; returns then. */
    public void serve() throws IOException {
        while (!closing) {
            SocketChannel c;
            try {
                c = listener.accept();
            } catch (ClosedChannelException e) {
                return;
            }
            if (!clientSlots.tryAcquire()) {
                c.close(); // -e N: more clients than allowed at once
                continue;
            }
            clients.add(c);
            try {
                if (c.getLocalAddress() instanceof java.net.UnixDomainSocketAddress) {
                    // A unix socket's buffer (about 200 KiB by default) is smaller than one 256 KiB READ reply of
                    // nbdcopy: each would wait for the client halfway. (TCP tunes its own buffers.)
                    c.setOption(java.net.StandardSocketOptions.SO_SNDBUF, SEND_BUFFER);
                }
            } catch (IOException e) {
                // only a hint: the connection works without it
            }
            threads.submit(() -> {
                try (c) {
                    new Connection(c).run();
                } catch (IOException | RuntimeException e) {
                    // the client's problem: its connection ends, the server goes on
                } finally {
                    clients.remove(c);
                    clientSlots.release();
                }
            });
        }
    }

    /** Stops accepting, lets requests in flight finish (up to a few seconds), then closes the connections. */
    @Override
    public void close() throws IOException {
        closing = true;
        listener.close();
        for (SocketChannel c : clients) {
            try {
                c.shutdownInput();
            } catch (IOException ignored) {
                // already gone
            }
        }
        threads.shutdown();
        try {
            threads.awaitTermination(10, TimeUnit.SECONDS);
            workers.shutdown();
            workers.awaitTermination(10, TimeUnit.SECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        for (SocketChannel c : clients) {
            c.close();
        }
    }

    private int transmissionFlags() {
        int f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if (writable == null) {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        return f;
    }

    /**
     * The NBD error for a failed write, trim, zeroing or flush: NBD_ENOSPC when the host file system is full (the
     * request may succeed once space is back: the image stays usable), NBD_EIO for anything else, including an
     * image that refuses writes after a failed sync (whatever the first error was).
     */
    static int errorOf(IOException e) {
        String m = e.getMessage();
        boolean full = m != null && !m.contains("unusable for writing")
                && (m.contains("No space left on device") || m.contains("Disk quota exceeded"));
        return full ? ENOSPC : EIO;
    }

    private static String e(int err) {
        return err == ENOSPC ? "no space left on the host file system" : "I/O error";
    }

    private static final ThreadLocal<ByteBuffer> READ_BUFFER = new ThreadLocal<>();

    /** A page-aligned direct buffer for a READ's data, kept per worker thread (the reply is sent before reuse). */
    private static ByteBuffer readBuffer(int len) {
        ByteBuffer b = READ_BUFFER.get();
        if (b == null || b.capacity() < len) {
            b = org.qdedup.io.Buffers.direct(Math.max(len, 1 << 20));
            READ_BUFFER.set(b);
        }
        return b.clear().limit(len);
    }

    /** READs of at least this many bytes go from the file to the socket by sendfile; smaller ones are copied and gathered. */
    static final int DIRECT_READ_MIN = 64 << 10;

    /** Bytes of requests read from the socket at once; WRITEs up to about this size run from it in place. */
    static final int IN_BUFFER = 1 << 20;
    /** Bytes of replies gathered before they are written; bigger replies (READ data) are written at once. */
    static final int OUT_BUFFER = 64 << 10;
    /** Replies the connection thread gathers at most before it writes them, so the client gets them early. */
    static final int MAX_GATHERED = 8;

    /** One client. */
    private final class Connection {
        private final SocketChannel ch;
        private final ReentrantLock replyLock = new ReentrantLock();
        private final Semaphore inFlight = new Semaphore(MAX_IN_FLIGHT);
        /** Requests read but not yet taken, in [position, limit). */
        private final ByteBuffer in = org.qdedup.io.Buffers.direct(IN_BUFFER).flip();
        /** Replies not written yet (under replyLock). */
        private final ByteBuffer out = org.qdedup.io.Buffers.direct(OUT_BUFFER);
        private int gathered;
        private Thread reader;
        private boolean structured;
        private boolean noZeroes;
        private int allocationContext; // 0: not negotiated

        Connection(SocketChannel ch) {
            this.ch = ch;
        }

        void run() throws IOException {
            writeFully(ch, serverGreeting());
            int clientFlags = readFully(ch, ByteBuffer.allocate(4)).getInt();
            if ((clientFlags & FLAG_FIXED_NEWSTYLE) == 0 || (clientFlags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) != 0) {
                return; // not a fixed-newstyle client, or flags we do not know: the spec says disconnect
            }
            noZeroes = (clientFlags & FLAG_NO_ZEROES) != 0;
            if (!negotiate()) {
                return;
            }
            transmit();
        }

        /** The option haggling; true when the client moved to transmission. */
        private boolean negotiate() throws IOException {
            for (;;) {
                ByteBuffer h = readFully(ch, ByteBuffer.allocate(16));
                if (h.getLong() != IHAVEOPT) {
                    return false;
                }
                int opt = h.getInt();
                long len = Integer.toUnsignedLong(h.getInt());
                if (len > MAX_OPTION) {
                    return false; // no client needs this much; reading it would only let it make us wait
                }
                ByteBuffer data = readFully(ch, ByteBuffer.allocate((int) len));
                switch (opt) {
                    case OPT_EXPORT_NAME -> {
                        String name = StandardCharsets.UTF_8.decode(data).toString();
                        if (!name.equals(exportName)) {
                            return false; // no error reply exists for this option
                        }
                        ByteBuffer r = ByteBuffer.allocate(noZeroes ? 10 : 134).putLong(image.size())
                                .putShort((short) transmissionFlags());
                        writeFully(ch, r.position(r.capacity()).flip());
                        return true;
                    }
                    case OPT_ABORT -> {
                        writeFully(ch, optionReply(opt, REP_ACK, null));
                        return false;
                    }
                    case OPT_LIST -> {
                        if (len != 0) {
                            writeFully(ch, errorReply(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data"));
                            continue;
                        }
                        writeFully(ch, optionReply(opt, REP_SERVER, serverEntry(exportName)));
                        writeFully(ch, optionReply(opt, REP_ACK, null));
                    }
                    case OPT_STRUCTURED_REPLY -> {
                        if (len != 0) {
                            writeFully(ch, errorReply(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"));
                            continue;
                        }
                        structured = true;
                        writeFully(ch, optionReply(opt, REP_ACK, null));
                    }
                    case OPT_INFO, OPT_GO -> {
                        if (info(opt, data) && opt == OPT_GO) {
                            return true;
                        }
                    }
                    case OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT -> metaContext(opt, data);
                    default -> writeFully(ch, errorReply(opt, REP_ERR_UNSUP, "option " + opt + " is not supported"));
                }
            }
        }

        /** NBD_OPT_INFO and NBD_OPT_GO; true when the export was found and described. */
        private boolean info(int opt, ByteBuffer d) throws IOException {
            if (d.remaining() < 6) {
                writeFully(ch, errorReply(opt, REP_ERR_INVALID, "option too short"));
                return false;
            }
            long nameLen = Integer.toUnsignedLong(d.getInt());
            if (nameLen > d.remaining() - 2) {
                writeFully(ch, errorReply(opt, REP_ERR_INVALID, "export name longer than the option"));
                return false;
            }
            byte[] n = new byte[(int) nameLen];
            d.get(n);
            int requests = Short.toUnsignedInt(d.getShort());
            if (d.remaining() != 2 * requests) {
                writeFully(ch, errorReply(opt, REP_ERR_INVALID, "information request count does not match the option length"));
                return false;
            }
            String name = new String(n, StandardCharsets.UTF_8);
            if (!name.equals(exportName)) {
                writeFully(ch, errorReply(opt, REP_ERR_UNKNOWN, "no export named '" + name + "'"));
                return false;
            }
            writeFully(ch, optionReply(opt, REP_INFO, infoExport(image.size(), transmissionFlags())));
            writeFully(ch, optionReply(opt, REP_INFO, infoBlockSize(1, 4096, MAX_PAYLOAD)));
            writeFully(ch, optionReply(opt, REP_ACK, null));
            return true;
        }

        private void metaContext(int opt, ByteBuffer d) throws IOException {
            if (opt == OPT_SET_META_CONTEXT && !structured) {
                writeFully(ch, errorReply(opt, REP_ERR_INVALID, "meta contexts need structured replies first"));
                return;
            }
            try {
                long nameLen = Integer.toUnsignedLong(d.getInt());
                if (nameLen > d.remaining()) {
                    throw new java.nio.BufferUnderflowException();
                }
                byte[] n = new byte[(int) nameLen];
                d.get(n);
                String name = new String(n, StandardCharsets.UTF_8);
                long queries = Integer.toUnsignedLong(d.getInt());
                boolean wantAllocation = opt == OPT_LIST_META_CONTEXT && queries == 0;
                for (long q = 0; q < queries; q++) {
                    long ql = Integer.toUnsignedLong(d.getInt());
                    if (ql > d.remaining()) {
                        throw new java.nio.BufferUnderflowException();
                    }
                    byte[] qb = new byte[(int) ql];
                    d.get(qb);
                    String query = new String(qb, StandardCharsets.UTF_8);
                    if (query.equals(BASE_ALLOCATION) || (opt == OPT_LIST_META_CONTEXT && query.equals("base:"))) {
                        wantAllocation = true;
                    }
                }
                if (d.hasRemaining()) {
                    throw new java.nio.BufferUnderflowException();
                }
                if (!name.equals(exportName)) {
                    writeFully(ch, errorReply(opt, REP_ERR_UNKNOWN, "no export named '" + name + "'"));
                    return;
                }
                if (opt == OPT_SET_META_CONTEXT) {
                    allocationContext = wantAllocation ? 1 : 0;
                }
                if (wantAllocation) {
                    writeFully(ch, optionReply(opt, REP_META_CONTEXT, NbdProtocol.metaContext(1, BASE_ALLOCATION)));
                }
                writeFully(ch, optionReply(opt, REP_ACK, null));
            } catch (java.nio.BufferUnderflowException e) {
                writeFully(ch, errorReply(opt, REP_ERR_INVALID, "malformed meta context option"));
            }
        }

        /**
         * Reads requests until the client disconnects. A plain WRITE (no FUA) runs right here, from the bytes read
         * (no copy, no thread hand-off), and its reply joins the replies gathered for one write to the socket: they
         * go out before this thread waits for the client, or after {@link #MAX_GATHERED} of them. Everything else
         * runs on the worker pool, so a slow flush or a big READ reply never stops the reading: a client may send
         * more while it waits for them. A WRITE's reply is small, so the socket's buffer does not fill with them.
         */
        private void transmit() throws IOException {
            reader = Thread.currentThread();
            try {
                for (;;) {
                    fill(28);
                    Request r = decodeRequest(in);
                    if (r.type() == CMD_DISC) {
                        break;
                    }
                    boolean here = r.type() == CMD_WRITE && (r.flags() & CMD_FLAG_FUA) == 0 && r.length() <= IN_BUFFER;
                    ByteBuffer payload = null;
                    if (r.type() == CMD_WRITE) {
                        if (r.length() > MAX_PAYLOAD) {
                            // We cannot skip what we will not read: answer, then end the connection.
                            reply(r, EOVERFLOW, "write of " + r.length() + " bytes is over the 32 MiB limit");
                            return;
                        }
                        payload = here ? take((int) r.length()) : takeCopy((int) r.length());
                    }
                    if (here) {
                        execute(r, payload);
                        continue;
                    }
                    inFlight.acquireUninterruptibly();
                    ByteBuffer p = payload;
                    workers.submit(() -> {
                        try {
                            execute(r, p);
                        } catch (IOException e) {
                            try {
                                ch.close();
                            } catch (IOException ignored) {
                                // already closed
                            }
                        } finally {
                            inFlight.release();
                        }
                    });
                }
            } catch (EOFException e) {
                // the client went away: requests in flight still finish below
            } finally {
                try {
                    writeGathered();
                } finally {
                    inFlight.acquireUninterruptibly(MAX_IN_FLIGHT); // wait for every request in flight
                    inFlight.release(MAX_IN_FLIGHT);
                }
            }
        }

        /**
         * Makes at least {@code n} (at most {@link #IN_BUFFER}) unread bytes available in {@link #in}, reading as
         * many as the socket has; the replies gathered so far are written first when it must wait for the client.
         */
        private void fill(int n) throws IOException {
            if (in.remaining() >= n) {
                return;
            }
            writeGathered();
            if (in.capacity() - in.position() < n) {
                in.compact().flip(); // the unread bytes move to the front
            }
            int start = in.position();
            while (in.remaining() < n) {
                int end = in.limit();
                in.limit(in.capacity()).position(end);
                int got = ch.read(in);
                in.limit(in.position()).position(start);
                if (got < 0) {
                    throw new EOFException("peer closed the connection");
                }
            }
        }

        /** The next {@code n} bytes, in place: valid until the next {@link #fill}. */
        private ByteBuffer take(int n) throws IOException {
            fill(n);
            ByteBuffer b = in.slice(in.position(), n);
            in.position(in.position() + n);
            return b;
        }

        /** The next {@code n} bytes in a buffer of their own (for a request run on another thread). */
        private ByteBuffer takeCopy(int n) throws IOException {
            ByteBuffer b = ByteBuffer.allocate(n);
            int have = Math.min(n, in.remaining());
            b.put(in.slice(in.position(), have));
            in.position(in.position() + have);
            return readFully(ch, b);
        }

        private void execute(Request r, ByteBuffer payload) throws IOException {
            long size = image.size();
            boolean rangeOk = r.offset() >= 0 && r.offset() <= size && r.length() <= size - r.offset();
            switch (r.type()) {
                case CMD_READ -> {
                    if (r.length() > MAX_PAYLOAD) {
                        reply(r, EOVERFLOW, "read of " + r.length() + " bytes is over the 32 MiB limit");
                    } else if (!rangeOk) {
                        reply(r, EINVAL, "read past the end of the export");
                    } else if (r.length() >= DIRECT_READ_MIN) {
                        replyReadDirect(r);
                    } else {
                        ByteBuffer data = readBuffer((int) r.length());
                        int err = 0;
                        try {
                            image.read(data, r.offset());
                            counters.reads.incrementAndGet();
                        } catch (IOException e) {
                            err = EIO;
                        }
                        if (err != 0) {
                            reply(r, err, "read failed");
                        } else {
                            replyData(r, data.flip());
                        }
                    }
                }
                case CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM -> {
                    if (writable == null) {
                        reply(r, EPERM, "the export is read-only");
                    } else if (!rangeOk) {
                        reply(r, EINVAL, "request past the end of the export");
                    } else {
                        int err = 0;
                        try {
                            if (r.type() == CMD_WRITE) {
                                writable.write(payload, r.offset());
                                counters.writes.incrementAndGet();
                            } else if (r.type() == CMD_WRITE_ZEROES) {
                                writable.writeZeroes(r.offset(), r.length(), (r.flags() & CMD_FLAG_NO_HOLE) == 0);
                                counters.zeroWrites.incrementAndGet();
                            } else {
                                writable.discard(r.offset(), r.length());
                                counters.trims.incrementAndGet();
                            }
                            if ((r.flags() & CMD_FLAG_FUA) != 0) {
                                writable.flush();
                            }
                        } catch (IOException e) {
                            err = errorOf(e);
                        }
                        reply(r, err, err == 0 ? null : "write failed: " + e(err));
                    }
                }
                case CMD_FLUSH -> {
                    int err = 0;
                    try {
                        if (writable != null) {
                            writable.flush();
                        }
                        counters.flushes.incrementAndGet();
                    } catch (IOException e) {
                        err = errorOf(e); // a flush writes metadata too: a full disk is ENOSPC here as well
                    }
                    reply(r, err, err == 0 ? null : "flush failed: " + e(err));
                }
                case CMD_CACHE -> reply(r, rangeOk ? 0 : EINVAL, rangeOk ? null : "request past the end of the export");
                case CMD_BLOCK_STATUS -> {
                    if (!structured || allocationContext == 0) {
                        reply(r, EINVAL, "block status needs structured replies and base:allocation");
                    } else if (!rangeOk || r.length() == 0) {
                        reply(r, EINVAL, "block status past the end of the export");
                    } else {
                        blockStatus(r);
                    }
                }
                default -> reply(r, EINVAL, "unknown command " + r.type());
            }
        }

        private void blockStatus(Request r) throws IOException {
            int max = (r.flags() & CMD_FLAG_REQ_ONE) != 0 ? 1 : 1024;
            ByteBuffer d = ByteBuffer.allocate(4 + 8 * max).putInt(allocationContext);
            long pos = r.offset(), end = r.offset() + r.length();
            int n = 0;
            try {
                while (pos < end && n < max) {
                    ChainStatus.Entry e = ChainStatus.entry(image, pos, Math.min(end - pos, 0xffff_f000L));
                    long len = Math.min(e.length(), 0xffff_f000L);
                    if (len <= 0) {
                        break;
                    }
                    int flags = (e.data() ? 0 : STATE_HOLE) | (e.zero() ? STATE_ZERO : 0);
                    d.putInt((int) len).putInt(flags);
                    n++;
                    pos += len;
                }
            } catch (IOException e) {
                reply(r, EIO, "block status failed");
                return;
            }
            d.flip();
            send(structuredHeader(r.cookie(), REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, d.remaining()), d);
        }

        /**
         * A READ reply whose data goes from the image file to the socket in the kernel (sendfile), not through a
         * buffer of ours: one copy of the data fewer. The reply's header goes out with the first piece, so a read
         * that fails at once still gets its error reply; one that fails after that can only end the connection.
         */
        private void replyReadDirect(Request r) throws IOException {
            ByteBuffer header = structured
                    ? ByteBuffer.allocate(28).put(structuredHeader(r.cookie(), REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                            (int) (8 + r.length()))).putLong(r.offset()).flip()
                    : simpleReply(r.cookie(), 0);
            boolean[] started = {false};
            BlockDevice.ReadSink sink = new BlockDevice.ReadSink() {
                private void start() throws IOException {
                    if (!started[0]) {
                        started[0] = true;
                        writeGathered(); // replies gathered before this one go first
                        writeFully(ch, header);
                    }
                }

                @Override
                public void file(org.qdedup.io.BlockFile f, long pos, long len) throws IOException {
                    start();
                    f.transferTo(pos, len, ch);
                }

                @Override
                public void bytes(ByteBuffer b) throws IOException {
                    start();
                    writeFully(ch, b);
                }
            };
            replyLock.lock();
            try {
                image.readTo(r.offset(), r.length(), sink, readBuffer((int) Math.min(r.length(), 1 << 20)));
                counters.reads.incrementAndGet();
            } catch (IOException e) {
                if (started[0]) {
                    throw e; // part of the data is out: the client cannot tell where it stopped
                }
                reply(r, EIO, "read failed");
            } finally {
                replyLock.unlock();
            }
        }

        private void replyData(Request r, ByteBuffer data) throws IOException {
            if (structured) {
                ByteBuffer off = ByteBuffer.allocate(8).putLong(r.offset()).flip();
                send(structuredHeader(r.cookie(), REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + data.remaining()), off, data);
            } else {
                send(simpleReply(r.cookie(), 0), data);
            }
        }

        private void reply(Request r, int error, String message) throws IOException {
            if (error == 0) {
                send(structured ? structuredHeader(r.cookie(), REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0) : simpleReply(r.cookie(), 0));
            } else if (structured) {
                send(structuredError(r.cookie(), error, message));
            } else {
                send(simpleReply(r.cookie(), error));
            }
        }

        /**
         * Sends one reply. A small one is gathered with others; the connection thread writes them later (see
         * {@link #transmit}), a worker at once, with whatever was gathered before it. A big one is written at once,
         * after the gathered ones, in one gathering write.
         */
        private void send(ByteBuffer... parts) throws IOException {
            long n = 0;
            for (ByteBuffer p : parts) {
                n += p.remaining();
            }
            replyLock.lock();
            try {
                if (n > out.remaining()) {
                    ByteBuffer[] all = new ByteBuffer[parts.length + 1];
                    all[0] = out.flip();
                    System.arraycopy(parts, 0, all, 1, parts.length);
                    writeAll(all);
                    out.clear();
                    gathered = 0;
                    return;
                }
                for (ByteBuffer p : parts) {
                    out.put(p);
                }
                if (++gathered >= MAX_GATHERED || Thread.currentThread() != reader) {
                    writeGathered();
                }
            } finally {
                replyLock.unlock();
            }
        }

        /** Writes the replies gathered so far. */
        private void writeGathered() throws IOException {
            replyLock.lock();
            try {
                if (out.position() > 0) {
                    writeFully(ch, out.flip());
                    out.clear();
                }
                gathered = 0;
            } finally {
                replyLock.unlock();
            }
        }

        private void writeAll(ByteBuffer[] parts) throws IOException {
            long left = 0;
            for (ByteBuffer p : parts) {
                left += p.remaining();
            }
            while (left > 0) {
                left -= ch.write(parts);
            }
        }
    }
}
