package org.qdedup.format;

/** Named bits of L1 and L2 entries, and the one function that classifies an L2 entry. */
public final class L2Entry {
    private L2Entry() {
    }

    public static final long COPIED = 1L << 63;
    public static final long COMPRESSED = 1L << 62;
    public static final long ZERO = 1L;
    /** Bits 9..55: host cluster offset of a standard entry (also the L1 entry's L2 table offset). */
    public static final long OFFSET_MASK = 0x00ff_ffff_ffff_fe00L;
    /** Bits that must be zero in a standard L2 entry (1..8 and 56..61); bit 0 too when entries are extended. */
    public static final long STANDARD_RESERVED = 0x3f00_0000_0000_01feL;
    /** Bits that must be zero in an L1 entry: 0..8 and 56..62. */
    public static final long L1_RESERVED = 0x7f00_0000_0000_01ffL;
    public static final long L1_OFFSET_MASK = OFFSET_MASK;

    /** Bitmap halves of an extended L2 entry's second word. */
    public static final long BITMAP_ALL_ALLOC = 0xffff_ffffL;

    public static long subAllocBit(int sc) {
        return 1L << sc;
    }

    public static long subZeroBit(int sc) {
        return 1L << (32 + sc);
    }

    public static boolean isCompressed(long entry) {
        return (entry & COMPRESSED) != 0;
    }

    public static long hostOffset(long entry) {
        return entry & OFFSET_MASK;
    }

    /** Reserved bits set in a standard (non-compressed) entry, or 0. */
    public static long reservedBits(long entry, boolean extended) {
        if (isCompressed(entry)) {
            return 0;
        }
        return entry & (extended ? STANDARD_RESERVED | ZERO : STANDARD_RESERVED);
    }

    /**
     * Classifies the (sub)cluster {@code sc} of an entry, as qcow2_get_subcluster_type does.
     *
     * @param hasDataFile an external data file makes offset 0 with COPIED a real cluster
     * @param bitmap      the extended L2 bitmap word, ignored unless {@code extended}
     */
    public static SubclusterType classify(long entry, long bitmap, boolean extended, boolean hasDataFile, int sc) {
        if (isCompressed(entry)) {
            return SubclusterType.COMPRESSED;
        }
        boolean allocated = (entry & OFFSET_MASK) != 0 || (hasDataFile && (entry & COPIED) != 0);
        if (!extended) {
            if ((entry & ZERO) != 0) {
                return allocated && (entry & OFFSET_MASK) != 0 ? SubclusterType.ZERO_ALLOC : SubclusterType.ZERO_PLAIN;
            }
            return allocated ? SubclusterType.NORMAL : SubclusterType.UNALLOCATED_PLAIN;
        }
        if (allocated) {
            if (((bitmap >>> 32) & bitmap) != 0) {
                return SubclusterType.INVALID;
            }
            if ((bitmap & subZeroBit(sc)) != 0) {
                return SubclusterType.ZERO_ALLOC;
            }
            return (bitmap & subAllocBit(sc)) != 0 ? SubclusterType.NORMAL : SubclusterType.UNALLOCATED_ALLOC;
        }
        if ((bitmap & BITMAP_ALL_ALLOC) != 0) {
            return SubclusterType.INVALID;
        }
        return (bitmap & subZeroBit(sc)) != 0 ? SubclusterType.ZERO_PLAIN : SubclusterType.UNALLOCATED_PLAIN;
    }

    /** Compressed descriptor: host byte offset of the compressed data. */
    public static long compressedOffset(long entry, int clusterBits) {
        int x = 62 - (clusterBits - 8);
        return entry & ((1L << x) - 1);
    }

    /** Compressed descriptor: bytes from the offset to the end of the last sector it names. */
    public static int compressedLength(long entry, int clusterBits) {
        int x = 62 - (clusterBits - 8);
        long sectors = ((entry >>> x) & ((1L << (clusterBits - 8)) - 1)) + 1;
        return (int) (sectors * 512 - (compressedOffset(entry, clusterBits) & 511));
    }

    /** Builds a compressed descriptor (host offset, compressed byte length). */
    public static long compressedEntry(long hostOffset, int length, int clusterBits) {
        int x = 62 - (clusterBits - 8);
        long sectors = ((hostOffset & 511) + length + 511) / 512;
        return COMPRESSED | ((sectors - 1) << x) | hostOffset;
    }
}
