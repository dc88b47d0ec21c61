package org.qdedup.format;

/** One header extension (type, raw data), kept byte for byte when the header is rewritten. */
public record HeaderExtension(long type, byte[] data) {
    public static final long END = 0;
    public static final long BACKING_FORMAT = 0xe2792acaL;
    public static final long FEATURE_NAMES = 0x6803f857L;
    public static final long BITMAPS = 0x23852875L;
    public static final long CRYPTO = 0x0537be77L;
    public static final long DATA_FILE = 0x44415441L;
    /** Ours: dedup is enabled on this image ("qddp"); QEMU keeps unknown extensions as they are. */
    public static final long DEDUP = 0x71646470L;

    /** Bytes this extension takes on disk: 8 bytes of type and length, data padded to 8. */
    public int encodedLength() {
        return 8 + ((data.length + 7) & ~7);
    }
}
