package org.qdedup.image;

import org.qdedup.io.BlockFile;

/**
 * One extent of block status, with QEMU's flag meanings (BDRV_BLOCK_*).
 *
 * @param length     bytes the status covers (> 0)
 * @param flags      bit set of {@link #DATA}, {@link #ZERO}, {@link #OFFSET_VALID}, {@link #ALLOCATED}, {@link #RECURSE}, {@link #EOF}
 * @param hostOffset where the extent lies in {@code file}, when OFFSET_VALID
 * @param file       the host file holding it, when OFFSET_VALID
 */
public record LayerStatus(long length, int flags, long hostOffset, BlockFile file) {
    public static final int DATA = 1;
    public static final int ZERO = 2;
    public static final int OFFSET_VALID = 4;
    public static final int ALLOCATED = 8;
    /** Ask the host file whether the mapped range is a hole (QEMU does this for metadata-preallocated images). */
    public static final int RECURSE = 16;
    public static final int EOF = 32;

    public boolean has(int flag) {
        return (flags & flag) != 0;
    }

    public LayerStatus withLength(long len) {
        return new LayerStatus(len, flags, hostOffset, file);
    }

    public LayerStatus withFlags(int f) {
        return new LayerStatus(length, f, hostOffset, file);
    }
}
