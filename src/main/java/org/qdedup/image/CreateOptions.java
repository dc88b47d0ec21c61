package org.qdedup.image;

/**
 * What a new qcow2 image looks like (qemu-img create's -o options).
 *
 * @param size            virtual size in bytes
 * @param clusterBits     9..21
 * @param version         2 (compat 0.10) or 3 (compat 1.1)
 * @param refcountOrder   0..6 (refcount_bits 1..64); 4 on v2
 * @param extendedL2      subcluster allocation (v3, clusters >= 16 KiB)
 * @param lazyRefcounts   compatible feature bit
 * @param compressionType 0 zlib, 1 zstd
 * @param backingFile     backing file name as stored (relative to the image's directory), or null
 * @param backingFormat   "raw"/"qcow2" or null
 * @param dataFile        external data file name, or null
 * @param dataFileRaw     the data file is a valid raw image
 */
public record CreateOptions(long size, int clusterBits, int version, int refcountOrder, boolean extendedL2,
                            boolean lazyRefcounts, int compressionType, String backingFile, String backingFormat,
                            String dataFile, boolean dataFileRaw) {
    public static CreateOptions defaults(long size) {
        return new CreateOptions(size, 16, 3, 4, false, false, 0, null, null, null, false);
    }

    public CreateOptions withClusterBits(int bits) {
        return new CreateOptions(size, bits, version, refcountOrder, extendedL2, lazyRefcounts, compressionType, backingFile,
                backingFormat, dataFile, dataFileRaw);
    }

    public CreateOptions withBacking(String file, String format) {
        return new CreateOptions(size, clusterBits, version, refcountOrder, extendedL2, lazyRefcounts, compressionType, file,
                format, dataFile, dataFileRaw);
    }

    public CreateOptions withVersion(int v) {
        return new CreateOptions(size, clusterBits, v, refcountOrder, extendedL2, lazyRefcounts, compressionType, backingFile,
                backingFormat, dataFile, dataFileRaw);
    }

    public CreateOptions withRefcountOrder(int o) {
        return new CreateOptions(size, clusterBits, version, o, extendedL2, lazyRefcounts, compressionType, backingFile,
                backingFormat, dataFile, dataFileRaw);
    }

    public CreateOptions withExtendedL2(boolean on) {
        return new CreateOptions(size, clusterBits, version, refcountOrder, on, lazyRefcounts, compressionType, backingFile,
                backingFormat, dataFile, dataFileRaw);
    }

    public CreateOptions withLazyRefcounts(boolean on) {
        return new CreateOptions(size, clusterBits, version, refcountOrder, extendedL2, on, compressionType, backingFile,
                backingFormat, dataFile, dataFileRaw);
    }

    public CreateOptions withCompressionType(int t) {
        return new CreateOptions(size, clusterBits, version, refcountOrder, extendedL2, lazyRefcounts, t, backingFile,
                backingFormat, dataFile, dataFileRaw);
    }

    public CreateOptions withDataFile(String name, boolean raw) {
        return new CreateOptions(size, clusterBits, version, refcountOrder, extendedL2, lazyRefcounts, compressionType,
                backingFile, backingFormat, name, raw);
    }

    public CreateOptions withSize(long s) {
        return new CreateOptions(s, clusterBits, version, refcountOrder, extendedL2, lazyRefcounts, compressionType,
                backingFile, backingFormat, dataFile, dataFileRaw);
    }
}
