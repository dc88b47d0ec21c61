package org.qdedup.format;

/** Header feature bits (qcow2 v3) with their names. */
public final class Features {
    private Features() {
    }

    public static final long INCOMPAT_DIRTY = 1L;
    public static final long INCOMPAT_CORRUPT = 1L << 1;
    public static final long INCOMPAT_DATA_FILE = 1L << 2;
    public static final long INCOMPAT_COMPRESSION = 1L << 3;
    public static final long INCOMPAT_EXTL2 = 1L << 4;
    public static final long INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

    public static final long COMPAT_LAZY_REFCOUNTS = 1L;

    public static final long AUTOCLEAR_BITMAPS = 1L;
    public static final long AUTOCLEAR_DATA_FILE_RAW = 1L << 1;
    /**
     * Ours: the dedup index file beside the image is in sync with it. An autoclear bit, so any QEMU that opens the
     * image read-write clears it; the highest bit, far from the ones QEMU hands out from the bottom.
     */
    public static final long AUTOCLEAR_DEDUP_INDEX = 1L << 63;

    static String incompatibleName(int bit) {
        return switch (bit) {
            case 0 -> "dirty bit";
            case 1 -> "corrupt bit";
            case 2 -> "external data file";
            case 3 -> "compression type";
            case 4 -> "extended L2 entries";
            default -> null;
        };
    }
}
