package org.qdedup.format;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * The qcow2 header, fields in spec order, with its extensions and backing file name.
 * Decoding validates everything an open relies on; unknown extensions and trailing header bytes are kept.
 */
public record Header(
        int version,
        long backingFileOffset,
        int backingFileSize,
        int clusterBits,
        long size,
        int cryptMethod,
        int l1Size,
        long l1TableOffset,
        long refcountTableOffset,
        int refcountTableClusters,
        int nbSnapshots,
        long snapshotsOffset,
        long incompatibleFeatures,
        long compatibleFeatures,
        long autoclearFeatures,
        int refcountOrder,
        int headerLength,
        int compressionType,
        byte[] trailingHeaderBytes,
        List<HeaderExtension> extensions,
        String backingFile) {

    public static final int MAGIC = 0x514649fb;
    public static final int V2_LENGTH = 72;
    public static final int V3_MIN_LENGTH = 104;
    /** Header length QEMU 7.2 writes for v3 (includes the compression type byte and padding). */
    public static final int V3_LENGTH = 112;
    public static final int MIN_CLUSTER_BITS = 9;
    public static final int MAX_CLUSTER_BITS = 21;
    /** QEMU's caps on table sizes (block/qcow2.h). */
    public static final long MAX_L1_BYTES = 32L << 20;
    public static final long MAX_REFTABLE_BYTES = 8L << 20;
    public static final int MAX_SNAPSHOTS = 65536;
    public static final int MAX_BACKING_NAME = 1023;
    public static final int COMPRESSION_ZLIB = 0;
    public static final int COMPRESSION_ZSTD = 1;

    public Header withRefcountTable(long offset, int clusters) {
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                offset, clusters, nbSnapshots, snapshotsOffset, incompatibleFeatures, compatibleFeatures, autoclearFeatures,
                refcountOrder, headerLength, compressionType, trailingHeaderBytes, extensions, backingFile);
    }

    public Header withSnapshots(int count, long offset) {
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, count, offset, incompatibleFeatures, compatibleFeatures,
                autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes, extensions, backingFile);
    }

    public Header withSize(long newSize) {
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, newSize, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
                compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes,
                extensions, backingFile);
    }

    public Header withL1(long offset, int entries) {
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, entries, offset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
                compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes,
                extensions, backingFile);
    }

    /** A header naming another backing file (null: none) and format (null: no backing format extension). */
    public Header withBacking(String name, String format) {
        List<HeaderExtension> exts = new ArrayList<>();
        boolean placed = false;
        for (HeaderExtension e : extensions) {
            if (e.type() == HeaderExtension.BACKING_FORMAT) {
                if (format != null && name != null && !placed) {
                    exts.add(new HeaderExtension(HeaderExtension.BACKING_FORMAT, format.getBytes(StandardCharsets.UTF_8)));
                    placed = true;
                }
            } else {
                exts.add(e);
            }
        }
        if (!placed && format != null && name != null) {
            exts.add(0, new HeaderExtension(HeaderExtension.BACKING_FORMAT, format.getBytes(StandardCharsets.UTF_8)));
        }
        return new Header(version, name == null ? 0 : backingFileOffset, name == null ? 0
                : name.getBytes(StandardCharsets.UTF_8).length, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
                compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes,
                List.copyOf(exts), name);
    }

    /** Bytes the encoded header, extensions and backing file name take in the first cluster. */
    public int encodedLength() {
        int len = version == 3 ? headerLength : V2_LENGTH;
        for (HeaderExtension e : extensions) {
            len += e.encodedLength();
        }
        len += 8;
        if (backingFile != null) {
            len += backingFile.getBytes(StandardCharsets.UTF_8).length;
        }
        return len;
    }

    /** Whether qdedup's dedup extension is present (dedup stays on for the image). */
    public boolean dedup() {
        return extension(HeaderExtension.DEDUP) != null;
    }

    /**
     * Generation stamp of the dedup index file that was in sync with this image at its last clean close (bytes
     * 16..23 of our dedup extension), or 0 when there is none.
     */
    public long dedupGeneration() {
        HeaderExtension e = extension(HeaderExtension.DEDUP);
        return e == null || e.data().length < 24 ? 0 : Be.u64(e.data(), 16);
    }

    /** Whether the header says the dedup index file is in sync (our autoclear bit, a generation, not dirty). */
    public boolean dedupIndexInSync() {
        return dedup() && (autoclearFeatures() & Features.AUTOCLEAR_DEDUP_INDEX) != 0 && dedupGeneration() != 0
                && !dirty();
    }

    /** Our dedup extension's payload: version 1, the snapshot headroom, the index generation. */
    public static HeaderExtension dedupExtension(int headroom, long generation) {
        byte[] data = new byte[32];
        Be.put64(data, 0, 1);
        Be.put32(data, 8, headroom);
        Be.put64(data, 16, generation);
        return new HeaderExtension(HeaderExtension.DEDUP, data);
    }

    /** Default snapshot headroom of dedup images: one snapshot must still fit after sharing. */
    public static final int DEFAULT_DEDUP_HEADROOM = 1;
    /** Largest headroom accepted; beyond it no width could share anything. */
    public static final int MAX_DEDUP_HEADROOM = 1 << 16;

    /**
     * Snapshots that must still fit after dedup shares a cluster: bytes 8..11 of our dedup extension (big-endian),
     * {@link #DEFAULT_DEDUP_HEADROOM} when the extension is shorter or holds a value out of range.
     */
    public int dedupHeadroom() {
        HeaderExtension e = extension(HeaderExtension.DEDUP);
        if (e == null || e.data().length < 12) {
            return DEFAULT_DEDUP_HEADROOM;
        }
        long v = Be.u32(e.data(), 8);
        return v > MAX_DEDUP_HEADROOM ? DEFAULT_DEDUP_HEADROOM : (int) v;
    }

    /** This header with an extension added (or replaced). */
    public Header withExtension(HeaderExtension ext) {
        List<HeaderExtension> exts = new ArrayList<>(withoutExtension(ext.type()).extensions());
        exts.add(ext);
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
                compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes,
                List.copyOf(exts), backingFile);
    }

    public Header withoutExtension(long type) {
        List<HeaderExtension> exts = new ArrayList<>();
        for (HeaderExtension e : extensions) {
            if (e.type() != type) {
                exts.add(e);
            }
        }
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
                compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes,
                List.copyOf(exts), backingFile);
    }

    public Header withAutoclear(long bits) {
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
                compatibleFeatures, bits, refcountOrder, headerLength, compressionType, trailingHeaderBytes, extensions, backingFile);
    }

    public Header withIncompatible(long bits) {
        return new Header(version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
                refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, bits, compatibleFeatures,
                autoclearFeatures, refcountOrder, headerLength, compressionType, trailingHeaderBytes, extensions, backingFile);
    }

    public long clusterSize() {
        return 1L << clusterBits;
    }

    public int refcountBits() {
        return 1 << refcountOrder;
    }

    public boolean extendedL2() {
        return (incompatibleFeatures & Features.INCOMPAT_EXTL2) != 0;
    }

    public boolean hasDataFile() {
        return (incompatibleFeatures & Features.INCOMPAT_DATA_FILE) != 0;
    }

    public boolean dataFileRaw() {
        return (autoclearFeatures & Features.AUTOCLEAR_DATA_FILE_RAW) != 0;
    }

    public boolean dirty() {
        return (incompatibleFeatures & Features.INCOMPAT_DIRTY) != 0;
    }

    public boolean corrupt() {
        return (incompatibleFeatures & Features.INCOMPAT_CORRUPT) != 0;
    }

    public boolean lazyRefcounts() {
        return (compatibleFeatures & Features.COMPAT_LAZY_REFCOUNTS) != 0;
    }

    public HeaderExtension extension(long type) {
        for (HeaderExtension e : extensions) {
            if (e.type() == type) {
                return e;
            }
        }
        return null;
    }

    /** The backing format, or null when there is none: no extension, or (as QEMU reads it) an empty name, probed. */
    public String backingFormat() {
        HeaderExtension e = extension(HeaderExtension.BACKING_FORMAT);
        String f = e == null ? null : cString(e.data(), 0, e.data().length);
        return f == null || f.isEmpty() ? null : f;
    }

    public String dataFile() {
        HeaderExtension e = extension(HeaderExtension.DATA_FILE);
        return e == null ? null : cString(e.data(), 0, e.data().length);
    }

    /** A name as QEMU reads it (a C string): up to its first NUL byte, if it has one. */
    private static String cString(byte[] b, int off, int len) {
        int end = off;
        while (end < off + len && b[end] != 0) {
            end++;
        }
        return new String(b, off, end - off, StandardCharsets.UTF_8);
    }

    /** Reads the cluster bits field alone, so the caller knows how much of the file holds the header. */
    public static int peekClusterBits(String file, byte[] start) throws FormatException {
        if (start.length < V2_LENGTH) {
            throw FormatException.at(file, "qcow2 header", 0, "at least " + V2_LENGTH + " bytes", start.length + " bytes");
        }
        if ((int) Be.u32(start, 0) != MAGIC) {
            throw FormatException.at(file, "qcow2 header magic", 0, "0x514649fb", String.format("0x%08x", Be.u32(start, 0)));
        }
        long bits = Be.u32(start, 20);
        if (bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
            throw FormatException.at(file, "qcow2 header cluster_bits", 20, MIN_CLUSTER_BITS + ".." + MAX_CLUSTER_BITS, Long.toString(bits));
        }
        return (int) bits;
    }

    /**
     * Decodes and validates the header from the image's first cluster (or all of a shorter file).
     *
     * @param file     name used in error messages
     * @param cluster  the first bytes of the file, at least up to the end of the first cluster if the file has them
     * @param fileSize the image file's size, for "past end of file" checks
     */
    public static Header decode(String file, byte[] cluster, long fileSize) throws FormatException {
        return decode(file, cluster, fileSize, false);
    }

    /**
     * As {@link #decode(String, byte[], long)}; with {@code allowPastEof} tables may run past the end of the file
     * (they read as zeros there, as in QEMU), which check and repair need to look at truncated images.
     */
    public static Header decode(String file, byte[] cluster, long fileSize, boolean allowPastEof) throws FormatException {
        if (allowPastEof) {
            fileSize = Long.MAX_VALUE / 2;
        }
        int clusterBits = peekClusterBits(file, cluster);
        long clusterSize = 1L << clusterBits;
        int version = (int) Be.u32(cluster, 4);
        if (version != 2 && version != 3) {
            throw FormatException.at(file, "qcow2 header version", 4, "2 or 3", Integer.toString(version));
        }
        long incompat = 0, compat = 0, autoclear = 0;
        int refcountOrder = 4, headerLength = V2_LENGTH, compressionType = COMPRESSION_ZLIB;
        if (version == 3) {
            if (cluster.length < V3_MIN_LENGTH) {
                throw FormatException.at(file, "qcow2 v3 header", 0, "at least " + V3_MIN_LENGTH + " bytes", cluster.length + " bytes");
            }
            incompat = Be.u64(cluster, 72);
            compat = Be.u64(cluster, 80);
            autoclear = Be.u64(cluster, 88);
            long order = Be.u32(cluster, 96);
            if (order > 6) {
                throw FormatException.at(file, "qcow2 header refcount_order", 96, "0..6", Long.toString(order));
            }
            refcountOrder = (int) order;
            long len = Be.u32(cluster, 100);
            if (len < V3_MIN_LENGTH || len > clusterSize || (len & 7) != 0 || len > cluster.length) {
                throw FormatException.at(file, "qcow2 header header_length", 100,
                        "a multiple of 8 in " + V3_MIN_LENGTH + ".." + Math.min(clusterSize, cluster.length), Long.toString(len));
            }
            headerLength = (int) len;
            if (headerLength > 104) {
                compressionType = cluster[104] & 0xff;
            }
        }
        long unknownIncompat = incompat & ~Features.INCOMPAT_KNOWN;
        if ((incompat & Features.INCOMPAT_COMPRESSION) == 0 && compressionType != COMPRESSION_ZLIB) {
            throw FormatException.at(file, "qcow2 header compression_type", 104,
                    "0 (zlib) without the compression type feature bit", Integer.toString(compressionType));
        }
        if ((incompat & Features.INCOMPAT_COMPRESSION) != 0 && compressionType == COMPRESSION_ZLIB) {
            // QEMU refuses it too: the bit announces a compression type other than the default.
            throw FormatException.at(file, "qcow2 header incompatible_features", 72,
                    "the compression type bit (3) only with a compression type other than zlib", String.format("0x%x", incompat));
        }
        if ((autoclear & Features.AUTOCLEAR_DATA_FILE_RAW) != 0 && (incompat & Features.INCOMPAT_DATA_FILE) == 0) {
            throw FormatException.at(file, "qcow2 header autoclear_features", 88,
                    "data-file-raw (bit 1) only with an external data file (incompatible bit 2)", String.format("0x%x", autoclear));
        }
        if (compressionType > COMPRESSION_ZSTD) {
            throw FormatException.at(file, "qcow2 header compression_type", 104, "0 (zlib) or 1 (zstd)", Integer.toString(compressionType));
        }
        long size = Be.u64(cluster, 24);
        if (size < 0) {
            throw FormatException.at(file, "qcow2 header size", 24, "at most 2^63-1", Long.toUnsignedString(size));
        }
        int cryptMethod = (int) Be.u32(cluster, 32);
        long l1Size = Be.u32(cluster, 36);
        long l1Offset = Be.u64(cluster, 40);
        long rtOffset = Be.u64(cluster, 48);
        long rtClusters = Be.u32(cluster, 56);
        long nbSnapshots = Be.u32(cluster, 60);
        long snapOffset = Be.u64(cluster, 64);
        long backingOffset = Be.u64(cluster, 8);
        long backingSize = Be.u32(cluster, 16);

        // Extensions follow the header and end with type 0 or at the backing file name / end of the first cluster.
        List<HeaderExtension> exts = new ArrayList<>();
        int extEnd = (int) Math.min(cluster.length, clusterSize);
        if (backingOffset != 0 && backingOffset < extEnd) {
            extEnd = (int) backingOffset;
        }
        int pos = headerLength;
        while (pos + 8 <= extEnd) {
            long type = Be.u32(cluster, pos);
            long len = Be.u32(cluster, pos + 4);
            // The length is checked first, the end marker's too, as QEMU does ("Header extension too large").
            if (len > extEnd - pos - 8) {
                throw FormatException.at(file, String.format("qcow2 header extension 0x%08x length", type), pos + 4,
                        "at most " + (extEnd - pos - 8), Long.toString(len));
            }
            if (type == HeaderExtension.END) {
                break;
            }
            exts.add(new HeaderExtension(type, Arrays.copyOfRange(cluster, pos + 8, pos + 8 + (int) len)));
            pos += 8 + (int) ((len + 7) & ~7L);
        }

        if (unknownIncompat != 0) {
            throw FormatException.of(file, "unsupported qcow2 incompatible feature(s): "
                    + unknownFeatureNames(unknownIncompat, exts) + String.format(" (incompatible_features 0x%x at offset 72)", incompat));
        }
        if (cryptMethod != 0 || findExt(exts, HeaderExtension.CRYPTO) != null) {
            throw FormatException.of(file, "encrypted qcow2 images are not supported (crypt_method " + cryptMethod + " at offset 32)");
        }
        if ((incompat & Features.INCOMPAT_EXTL2) != 0 && clusterBits < 14) {
            throw FormatException.at(file, "qcow2 header cluster_bits with extended L2", 20, "at least 14", Integer.toString(clusterBits));
        }
        if (version == 2 && refcountOrder != 4) {
            throw new IllegalStateException("unreachable");
        }

        String backing = null;
        if (backingOffset != 0) {
            if (backingSize > MAX_BACKING_NAME) {
                throw FormatException.at(file, "qcow2 header backing_file_size", 16, "at most " + MAX_BACKING_NAME, Long.toString(backingSize));
            }
            if (backingOffset < 0 || backingOffset > clusterSize - backingSize || backingOffset + backingSize > cluster.length) {
                throw FormatException.at(file, "qcow2 header backing_file_offset", 8, "a name inside the first cluster and the file",
                        Long.toUnsignedString(backingOffset) + " (+" + backingSize + " bytes)");
            }
            backing = cString(cluster, (int) backingOffset, (int) backingSize);
            if (backing.isEmpty()) {
                backing = null; // QEMU: an empty name is no backing file
            }
        }

        long l2Entries = clusterSize / ((incompat & Features.INCOMPAT_EXTL2) != 0 ? 16 : 8);
        long bytesPerL1 = l2Entries * clusterSize;
        long neededL1 = size == 0 ? 0 : (size - 1) / bytesPerL1 + 1; // rounded up without overflow near 2^63
        if (l1Size * 8 > MAX_L1_BYTES) {
            throw FormatException.at(file, "qcow2 header l1_size", 36, "at most " + (MAX_L1_BYTES / 8) + " entries", Long.toString(l1Size));
        }
        if (l1Size < neededL1) {
            throw FormatException.at(file, "qcow2 header l1_size", 36, "at least " + neededL1 + " for the image size", Long.toString(l1Size));
        }
        checkTable(file, "L1 table", 40, l1Offset, l1Size * 8, clusterSize, fileSize, l1Size > 0);
        if (rtClusters * clusterSize > MAX_REFTABLE_BYTES) {
            throw FormatException.at(file, "qcow2 header refcount_table_clusters", 56,
                    "at most " + (MAX_REFTABLE_BYTES / clusterSize), Long.toString(rtClusters));
        }
        if (rtClusters == 0) {
            // As QEMU ("Image does not contain a reference count table"): nothing could be allocated safely.
            throw FormatException.at(file, "qcow2 header refcount_table_clusters", 56, "at least 1", "0");
        }
        checkTable(file, "refcount table", 48, rtOffset, rtClusters * clusterSize, clusterSize, fileSize, true);
        if (nbSnapshots > MAX_SNAPSHOTS) {
            throw FormatException.at(file, "qcow2 header nb_snapshots", 60, "at most " + MAX_SNAPSHOTS, Long.toString(nbSnapshots));
        }
        checkTable(file, "snapshot table", 64, snapOffset, nbSnapshots == 0 ? 0 : 1, clusterSize, fileSize, nbSnapshots > 0);

        byte[] trailing = version == 3 && headerLength > V3_LENGTH
                ? Arrays.copyOfRange(cluster, V3_LENGTH, headerLength) : new byte[0];
        return new Header(version, backingOffset, (int) backingSize, clusterBits, size, cryptMethod, (int) l1Size, l1Offset,
                rtOffset, (int) rtClusters, (int) nbSnapshots, snapOffset, incompat, compat, autoclear, refcountOrder,
                headerLength, compressionType, trailing, List.copyOf(exts), backing);
    }

    private static HeaderExtension findExt(List<HeaderExtension> exts, long type) {
        for (HeaderExtension e : exts) {
            if (e.type() == type) {
                return e;
            }
        }
        return null;
    }

    /** Names unknown incompatible bits from the image's own feature name table where it has one. */
    private static String unknownFeatureNames(long bits, List<HeaderExtension> exts) {
        HeaderExtension names = findExt(exts, HeaderExtension.FEATURE_NAMES);
        StringBuilder sb = new StringBuilder();
        for (int bit = 0; bit < 64; bit++) {
            if ((bits & (1L << bit)) == 0) {
                continue;
            }
            String name = null;
            if (names != null) {
                byte[] d = names.data();
                for (int i = 0; i + 48 <= d.length; i += 48) {
                    if (d[i] == 0 && (d[i + 1] & 0xff) == bit) {
                        int end = i + 2;
                        while (end < i + 48 && d[end] != 0) {
                            end++;
                        }
                        name = new String(d, i + 2, end - i - 2, StandardCharsets.UTF_8);
                    }
                }
            }
            if (sb.length() > 0) {
                sb.append(", ");
            }
            sb.append(name != null ? name : "unknown incompatible feature").append(" (bit ").append(bit).append(')');
        }
        return sb.toString();
    }

    private static void checkTable(String file, String table, int field, long offset, long bytes, long clusterSize,
                                   long fileSize, boolean present) throws FormatException {
        if (!present) {
            return;
        }
        if (offset <= 0 || (offset & (clusterSize - 1)) != 0) {
            throw FormatException.at(file, "qcow2 header " + table + " offset", field, "a non-zero multiple of the cluster size "
                    + clusterSize, Long.toUnsignedString(offset));
        }
        if (offset > fileSize || bytes > fileSize - offset) {
            throw FormatException.at(file, "qcow2 header " + table + " offset", field,
                    "a table inside the file (" + fileSize + " bytes)", offset + " + " + bytes + " bytes");
        }
    }

    /** Encodes the header and its extensions into a buffer of one cluster; the backing file name goes after them. */
    public byte[] encode() {
        byte[] out = new byte[(int) clusterSize()];
        Be.put32(out, 0, MAGIC);
        Be.put32(out, 4, version);
        Be.put32(out, 16, backingFile == null ? 0 : backingFile.getBytes(StandardCharsets.UTF_8).length);
        Be.put32(out, 20, clusterBits);
        Be.put64(out, 24, size);
        Be.put32(out, 32, cryptMethod);
        Be.put32(out, 36, l1Size);
        Be.put64(out, 40, l1TableOffset);
        Be.put64(out, 48, refcountTableOffset);
        Be.put32(out, 56, refcountTableClusters);
        Be.put32(out, 60, nbSnapshots);
        Be.put64(out, 64, snapshotsOffset);
        int pos = V2_LENGTH;
        if (version == 3) {
            Be.put64(out, 72, incompatibleFeatures);
            Be.put64(out, 80, compatibleFeatures);
            Be.put64(out, 88, autoclearFeatures);
            Be.put32(out, 96, refcountOrder);
            Be.put32(out, 100, headerLength);
            if (headerLength > 104) {
                out[104] = (byte) compressionType;
            }
            System.arraycopy(trailingHeaderBytes, 0, out, V3_LENGTH, trailingHeaderBytes.length);
            pos = headerLength;
        }
        for (HeaderExtension e : extensions) {
            Be.put32(out, pos, e.type());
            Be.put32(out, pos + 4, e.data().length);
            System.arraycopy(e.data(), 0, out, pos + 8, e.data().length);
            pos += e.encodedLength();
        }
        pos += 8; // end-of-extensions marker (type 0, length 0)
        if (backingFile != null) {
            byte[] name = backingFile.getBytes(StandardCharsets.UTF_8);
            Be.put64(out, 8, pos);
            System.arraycopy(name, 0, out, pos, name.length);
        }
        return out;
    }
}
