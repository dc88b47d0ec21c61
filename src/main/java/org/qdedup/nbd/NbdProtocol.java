package org.qdedup.nbd;

import java.io.EOFException;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.ByteChannel;
import java.nio.charset.StandardCharsets;

/**
 * The NBD wire format (doc/proto.md of the NBD project): constants, and the encoding and decoding of handshake
 * messages, requests and replies. No policy here: what to answer is the export handler's business.
 */
public final class NbdProtocol {
    private NbdProtocol() {
    }

    public static final long NBDMAGIC = 0x4e42444d41474943L;
    public static final long IHAVEOPT = 0x49484156454F5054L;
    public static final long OPTION_REPLY_MAGIC = 0x3e889045565a9L;
    public static final int REQUEST_MAGIC = 0x25609513;
    public static final int SIMPLE_REPLY_MAGIC = 0x67446698;
    public static final int STRUCTURED_REPLY_MAGIC = 0x668e33ef;

    // handshake flags (server) and client flags
    public static final int FLAG_FIXED_NEWSTYLE = 1, FLAG_NO_ZEROES = 2;

    // options
    public static final int OPT_EXPORT_NAME = 1, OPT_ABORT = 2, OPT_LIST = 3, OPT_STARTTLS = 5, OPT_INFO = 6, OPT_GO = 7,
            OPT_STRUCTURED_REPLY = 8, OPT_LIST_META_CONTEXT = 9, OPT_SET_META_CONTEXT = 10;

    // option replies
    public static final int REP_ACK = 1, REP_SERVER = 2, REP_INFO = 3, REP_META_CONTEXT = 4;
    public static final int REP_ERR_UNSUP = 0x80000001, REP_ERR_POLICY = 0x80000002, REP_ERR_INVALID = 0x80000003,
            REP_ERR_UNKNOWN = 0x80000006, REP_ERR_TOO_BIG = 0x80000009;

    // NBD_INFO types
    public static final int INFO_EXPORT = 0, INFO_NAME = 1, INFO_DESCRIPTION = 2, INFO_BLOCK_SIZE = 3;

    // transmission flags
    public static final int TF_HAS_FLAGS = 1, TF_READ_ONLY = 2, TF_SEND_FLUSH = 4, TF_SEND_FUA = 8, TF_SEND_TRIM = 32,
            TF_SEND_WRITE_ZEROES = 64, TF_CAN_MULTI_CONN = 256, TF_SEND_CACHE = 1024, TF_SEND_FAST_ZERO = 2048;

    // commands and command flags
    public static final int CMD_READ = 0, CMD_WRITE = 1, CMD_DISC = 2, CMD_FLUSH = 3, CMD_TRIM = 4, CMD_CACHE = 5,
            CMD_WRITE_ZEROES = 6, CMD_BLOCK_STATUS = 7;
    public static final int CMD_FLAG_FUA = 1, CMD_FLAG_NO_HOLE = 2, CMD_FLAG_DF = 4, CMD_FLAG_REQ_ONE = 8,
            CMD_FLAG_FAST_ZERO = 16;

    // structured reply flags and types
    public static final int REPLY_FLAG_DONE = 1;
    public static final int REPLY_TYPE_NONE = 0, REPLY_TYPE_OFFSET_DATA = 1, REPLY_TYPE_OFFSET_HOLE = 2,
            REPLY_TYPE_BLOCK_STATUS = 5, REPLY_TYPE_ERROR = 0x8001;

    // base:allocation flags
    public static final int STATE_HOLE = 1, STATE_ZERO = 2;

    // errors
    public static final int EPERM = 1, EIO = 5, ENOMEM = 12, EINVAL = 22, ENOSPC = 28, EOVERFLOW = 75, ENOTSUP = 95,
            ESHUTDOWN = 108;

    public static final String BASE_ALLOCATION = "base:allocation";

    /** One transmission request's header (a WRITE's data follows it on the wire). */
    public record Request(int flags, int type, long cookie, long offset, long length) {
    }

    /** Reads exactly {@code n} bytes, or throws EOFException when the peer goes away first. */
    public static ByteBuffer readFully(ByteChannel ch, ByteBuffer b) throws IOException {
        while (b.hasRemaining()) {
            if (ch.read(b) < 0) {
                throw new EOFException("peer closed the connection");
            }
        }
        return b.flip();
    }

    public static void writeFully(ByteChannel ch, ByteBuffer b) throws IOException {
        while (b.hasRemaining()) {
            ch.write(b);
        }
    }

    public static ByteBuffer serverGreeting() {
        return ByteBuffer.allocate(18).putLong(NBDMAGIC).putLong(IHAVEOPT).putShort((short) (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).flip();
    }

    public static ByteBuffer optionReply(int option, int type, ByteBuffer data) {
        int n = data == null ? 0 : data.remaining();
        ByteBuffer b = ByteBuffer.allocate(20 + n).putLong(OPTION_REPLY_MAGIC).putInt(option).putInt(type).putInt(n);
        if (data != null) {
            b.put(data);
        }
        return b.flip();
    }

    public static ByteBuffer errorReply(int option, int type, String message) {
        return optionReply(option, type, ByteBuffer.wrap(message.getBytes(StandardCharsets.UTF_8)));
    }

    public static ByteBuffer infoExport(long size, int transmissionFlags) {
        return ByteBuffer.allocate(12).putShort((short) INFO_EXPORT).putLong(size).putShort((short) transmissionFlags).flip();
    }

    public static ByteBuffer infoBlockSize(int min, int preferred, int max) {
        return ByteBuffer.allocate(14).putShort((short) INFO_BLOCK_SIZE).putInt(min).putInt(preferred).putInt(max).flip();
    }

    public static ByteBuffer serverEntry(String name) {
        byte[] n = name.getBytes(StandardCharsets.UTF_8);
        return ByteBuffer.allocate(4 + n.length).putInt(n.length).put(n).flip();
    }

    public static ByteBuffer metaContext(int id, String name) {
        byte[] n = name.getBytes(StandardCharsets.UTF_8);
        return ByteBuffer.allocate(4 + n.length).putInt(id).put(n).flip();
    }

    public static Request decodeRequest(ByteBuffer b) throws IOException {
        int magic = b.getInt();
        if (magic != REQUEST_MAGIC) {
            throw new IOException("bad request magic 0x" + Integer.toHexString(magic));
        }
        int flags = Short.toUnsignedInt(b.getShort());
        int type = Short.toUnsignedInt(b.getShort());
        long cookie = b.getLong();
        long offset = b.getLong();
        long length = Integer.toUnsignedLong(b.getInt());
        return new Request(flags, type, cookie, offset, length);
    }

    public static ByteBuffer simpleReply(long cookie, int error) {
        return ByteBuffer.allocate(16).putInt(SIMPLE_REPLY_MAGIC).putInt(error).putLong(cookie).flip();
    }

    public static ByteBuffer structuredHeader(long cookie, int flags, int type, int length) {
        return ByteBuffer.allocate(20).putInt(STRUCTURED_REPLY_MAGIC).putShort((short) flags).putShort((short) type)
                .putLong(cookie).putInt(length).flip();
    }

    public static ByteBuffer structuredError(long cookie, int error, String message) {
        byte[] m = message.getBytes(StandardCharsets.UTF_8);
        ByteBuffer b = ByteBuffer.allocate(20 + 6 + m.length);
        b.put(structuredHeader(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + m.length));
        b.putInt(error).putShort((short) m.length).put(m);
        return b.flip();
    }
}
