package org.qdedup.image;

import java.io.IOException;

/**
 * Block status through a backing chain, as qemu-img map computes it: the generic block layer's rules (size clamp,
 * ALLOCATED, zero past the backing end or without backing, asking the host file of preallocated images) applied
 * layer by layer until one holds the range.
 */
public final class ChainStatus {
    private ChainStatus() {
    }

    /** One map record before merging. */
    public record Entry(long start, long length, int depth, boolean present, boolean zero, boolean data,
                        boolean hasOffset, long offset, Object file) {
    }

    /** The status of {@code dev} alone from {@code offset}, with the block layer's adjustments (bdrv_co_block_status). */
    public static LayerStatus layer(BlockDevice dev, long offset, long bytes) throws IOException {
        long total = dev.size();
        if (offset >= total) {
            return new LayerStatus(0, LayerStatus.EOF, 0, null);
        }
        bytes = Math.min(bytes, total - offset);
        LayerStatus st = dev.status(offset, bytes);
        int f = st.flags();
        long n = Math.min(st.length(), bytes);
        if ((f & (LayerStatus.DATA | LayerStatus.ZERO)) != 0) {
            f |= LayerStatus.ALLOCATED;
        } else if (dev instanceof Qcow2Image) {
            BlockDevice b = dev.backing();
            if (b == null || offset >= b.size()) {
                f |= LayerStatus.ZERO;
            }
        }
        if ((f & LayerStatus.RECURSE) != 0 && (f & LayerStatus.DATA) != 0 && (f & LayerStatus.ZERO) == 0
                && (f & LayerStatus.OFFSET_VALID) != 0 && st.file() != null) {
            LayerStatus fs = FileStatus.of(st.file(), st.hostOffset(), n, FileStatus.sectorLength(st.file().size()));
            if (fs.has(LayerStatus.EOF) && (fs.length() == 0 || fs.has(LayerStatus.ZERO))) {
                f |= LayerStatus.ZERO;
            } else {
                n = fs.length();
                f |= fs.flags() & LayerStatus.ZERO;
            }
        }
        f &= ~LayerStatus.RECURSE;
        if (offset + n == total) {
            f |= LayerStatus.EOF;
        }
        return new LayerStatus(n, f, st.hostOffset(), st.file());
    }

    /** qemu-img's get_block_status: walks down the chain until a layer has data or zeros. */
    public static Entry entry(BlockDevice top, long offset, long bytes) throws IOException {
        BlockDevice dev = top;
        int depth = 0;
        LayerStatus st;
        for (;;) {
            st = layer(dev, offset, bytes);
            bytes = st.length();
            if ((st.flags() & (LayerStatus.ZERO | LayerStatus.DATA)) != 0) {
                break;
            }
            BlockDevice next = dev.backing();
            if (next == null) {
                st = st.withFlags(0);
                break;
            }
            dev = next;
            depth++;
        }
        boolean hasOffset = st.has(LayerStatus.OFFSET_VALID);
        return new Entry(offset, bytes, depth, st.has(LayerStatus.ALLOCATED), st.has(LayerStatus.ZERO),
                st.has(LayerStatus.DATA), hasOffset, hasOffset ? st.hostOffset() : 0, hasOffset ? st.file() : null);
    }

    /** qemu-img map's entry_mergeable. */
    public static boolean mergeable(Entry cur, Entry next) {
        if (cur.length() == 0) {
            return false;
        }
        if (cur.zero() != next.zero() || cur.data() != next.data() || cur.depth() != next.depth()
                || cur.present() != next.present() || (cur.file() == null) != (next.file() == null)
                || cur.hasOffset() != next.hasOffset()) {
            return false;
        }
        if (cur.file() != null && cur.file() != next.file()) {
            return false;
        }
        return !cur.hasOffset() || cur.offset() + cur.length() == next.offset();
    }

    public static Entry merge(Entry cur, Entry next) {
        return new Entry(cur.start(), cur.length() + next.length(), cur.depth(), cur.present(), cur.zero(), cur.data(),
                cur.hasOffset(), cur.offset(), cur.file());
    }
}
