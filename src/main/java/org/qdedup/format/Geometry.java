package org.qdedup.format;

/** Index arithmetic of one image: guest offset to L1 index, L2 index, subcluster, offset in cluster. */
public record Geometry(int clusterBits, boolean extendedL2) {
    public long clusterSize() {
        return 1L << clusterBits;
    }

    /** Bytes of one L2 entry: 8, or 16 with extended L2. */
    public int l2EntrySize() {
        return extendedL2 ? 16 : 8;
    }

    public int l2Bits() {
        return clusterBits - (extendedL2 ? 4 : 3);
    }

    public int l2Entries() {
        return 1 << l2Bits();
    }

    public long subclusterSize() {
        return extendedL2 ? clusterSize() / 32 : clusterSize();
    }

    public long offsetInCluster(long offset) {
        return offset & (clusterSize() - 1);
    }

    public long clusterStart(long offset) {
        return offset & -clusterSize();
    }

    public int l1Index(long guestOffset) {
        return (int) (guestOffset >>> (clusterBits + l2Bits()));
    }

    public int l2Index(long guestOffset) {
        return (int) ((guestOffset >>> clusterBits) & (l2Entries() - 1));
    }

    public int subclusterIndex(long guestOffset) {
        return extendedL2 ? (int) (offsetInCluster(guestOffset) / subclusterSize()) : 0;
    }

    /** Bytes of guest data one L2 table covers. */
    public long bytesPerL2() {
        return (long) l2Entries() << clusterBits;
    }

    /** L1 entries needed for a virtual size. */
    public long l1EntriesFor(long size) {
        return size <= 0 ? 0 : (size - 1) / bytesPerL2() + 1;
    }
}
