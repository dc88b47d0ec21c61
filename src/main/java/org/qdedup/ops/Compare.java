package org.qdedup.ops;

import org.qdedup.io.Buffers;
import java.io.IOException;
import java.nio.ByteBuffer;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ChainStatus;

/** qemu-img compare: guest-visible contents; the first difference is reported at 512-byte granularity. */
public final class Compare {
    private Compare() {
    }

    /** Outcome: identical, or the first differing offset, or a strict-mode size mismatch. */
    public record Result(boolean identical, long mismatchOffset, boolean sizeMismatch) {
    }

    private static final int CHUNK = 1 << 20;

    public static Result compare(BlockDevice a, BlockDevice b, boolean strict) throws IOException {
        if (strict && a.size() != b.size()) {
            return new Result(false, -1, true);
        }
        long common = Math.min(a.size(), b.size());
        ByteBuffer ba = Buffers.direct(CHUNK), bb = org.qdedup.io.Buffers.direct(CHUNK);
        for (long pos = 0; pos < common; ) {
            int n = (int) Math.min(CHUNK, common - pos);
            ChainStatus.Entry ea = ChainStatus.entry(a, pos, n);
            ChainStatus.Entry eb = ChainStatus.entry(b, pos, n);
            long step = Math.min(ea.length(), eb.length());
            if (ea.zero() && eb.zero() && !ea.data() && !eb.data()) {
                pos += step;
                continue;
            }
            int len = (int) step;
            ba.clear().limit(len);
            bb.clear().limit(len);
            a.read(ba, pos);
            b.read(bb, pos);
            ba.flip();
            bb.flip();
            int m = ba.mismatch(bb);
            if (m >= 0) {
                return new Result(false, (pos + m) & ~511L, false);
            }
            pos += step;
        }
        BlockDevice longer = a.size() > b.size() ? a : b;
        long off = firstNonZero(longer, common, longer.size());
        return off < 0 ? new Result(true, -1, a.size() != b.size()) : new Result(false, off & ~511L, true);
    }

    /** First non-zero byte offset of a device range, or -1. */
    public static long firstNonZero(BlockDevice d, long from, long to) throws IOException {
        ByteBuffer buf = Buffers.direct(CHUNK);
        ByteBuffer zeros = Buffers.direct(CHUNK);
        for (long pos = from; pos < to; ) {
            ChainStatus.Entry e = ChainStatus.entry(d, pos, Math.min(CHUNK, to - pos));
            if (e.zero() && !e.data()) {
                pos += e.length();
                continue;
            }
            int len = (int) e.length();
            buf.clear().limit(len);
            d.read(buf, pos);
            buf.flip();
            int m = buf.mismatch(zeros.slice(0, len));
            if (m >= 0) {
                return pos + m;
            }
            pos += len;
        }
        return -1;
    }
}
