package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import org.qdedup.format.Be;
import org.qdedup.format.Header;
import org.qdedup.io.BlockFile;

/** Read-only refcount lookup through the refcount table and blocks (any width 1..64 bits). */
public final class Refcounts {
    private final BlockFile file;
    private final Header header;
    private long[] table;
    private long cachedBlockOffset = -1;
    private byte[] cachedBlock;

    Refcounts(BlockFile file, Header header) {
        this.file = file;
        this.header = header;
    }

    /** Refcount entries in one refcount block. */
    public long entriesPerBlock() {
        return header.clusterSize() * 8 / header.refcountBits();
    }

    /** The refcount of host cluster {@code cluster} (0 where no block covers it). */
    public synchronized long get(long cluster) throws IOException {
        if (table == null) {
            int n = (int) (header.refcountTableClusters() * header.clusterSize() / 8);
            byte[] raw = new byte[n * 8];
            file.readFully(ByteBuffer.wrap(raw), header.refcountTableOffset());
            table = new long[n];
            for (int i = 0; i < n; i++) {
                table[i] = Be.u64(raw, i * 8);
            }
        }
        long per = entriesPerBlock();
        long ti = cluster / per;
        if (ti >= table.length) {
            return 0;
        }
        long blockOffset = table[(int) ti] & ~((1L << 9) - 1) & 0x00ff_ffff_ffff_ffffL;
        if (blockOffset == 0) {
            return 0;
        }
        if (blockOffset != cachedBlockOffset) {
            cachedBlock = new byte[(int) header.clusterSize()];
            file.readFully(ByteBuffer.wrap(cachedBlock), blockOffset);
            cachedBlockOffset = blockOffset;
        }
        return entry(cachedBlock, (int) (cluster % per), header.refcountOrder());
    }

    /** Decodes entry {@code i} of a refcount block of 2^order-bit entries (sub-byte widths LSB first). */
    static long entry(byte[] block, int i, int order) {
        int bits = 1 << order;
        if (bits >= 8) {
            int bytes = bits / 8;
            long v = 0;
            for (int k = 0; k < bytes; k++) {
                v = (v << 8) | (block[i * bytes + k] & 0xff);
            }
            return v;
        }
        int perByte = 8 / bits;
        int b = block[i / perByte] & 0xff;
        int shift = (i % perByte) * bits;
        return (b >>> shift) & ((1 << bits) - 1);
    }
}
