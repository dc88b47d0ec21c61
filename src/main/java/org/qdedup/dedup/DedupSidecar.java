package org.qdedup.dedup;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.AtomicMoveNotSupportedException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.util.Arrays;
import java.util.zip.CRC32C;
import org.qdedup.format.Be;
import org.qdedup.format.FormatException;
import org.qdedup.io.FileStamp;

/**
 * The dedup index file kept beside an image ({@code IMAGE.qdedup-index}): the in-RAM keys of the indexed
 * clusters as they were at the image's last clean close, tied to that exact state of the image.
 *
 * <p>Layout (big-endian; see docs/dedup-index.md): a 96-byte header — magic {@code "qdedupix"}, version (u32 = 1),
 * cluster_bits (u32), generation (u64), the image file's size, inode, ctime and mtime in nanoseconds (u64 each),
 * entry count (u64), 24 reserved zero bytes — then the entries, 8 bytes each (u32 SHA-256 fragment, u32 host
 * cluster), ascending by cluster, then a CRC32C (u32) of everything before it.
 */
public final class DedupSidecar {
    static final byte[] MAGIC = "qdedupix".getBytes(StandardCharsets.US_ASCII);
    public static final int VERSION = 1;
    static final int HEADER_SIZE = 96;
    static final int ENTRY_SIZE = 8;
    /** The name beside the image: the image's file name plus this. */
    public static final String SUFFIX = ".qdedup-index";

    /** What the file holds. Entries are sorted by cluster. */
    public record Contents(int clusterBits, long generation, FileStamp stamp, int[] fragments, long[] clusters) {
        /** The fragment recorded for a host cluster as an unsigned value, or -1 when the file has none for it. */
        public long keyOf(long cluster) {
            int i = Arrays.binarySearch(clusters, cluster);
            return i >= 0 ? Integer.toUnsignedLong(fragments[i]) : -1;
        }
    }

    private DedupSidecar() {
    }

    public static Path pathFor(Path image) {
        return image.resolveSibling(image.getFileName() + SUFFIX);
    }

    public static byte[] encode(int clusterBits, long generation, FileStamp stamp, DedupIndex index) {
        int n = index.size();
        byte[] b = new byte[HEADER_SIZE + ENTRY_SIZE * n + 4];
        ByteBuffer bb = ByteBuffer.wrap(b); // big-endian
        bb.put(MAGIC).putInt(VERSION).putInt(clusterBits).putLong(generation).putLong(stamp.size())
                .putLong(stamp.inode()).putLong(stamp.ctimeNanos()).putLong(stamp.mtimeNanos()).putLong(n);
        bb.position(HEADER_SIZE);
        // The cluster map is ordered already: no sort (this runs at every clean close, once, mostly interpreted).
        index.forEachByCluster((frag, cluster) -> bb.putInt(frag).putInt((int) cluster));
        if (bb.position() != HEADER_SIZE + ENTRY_SIZE * n) {
            throw new IllegalStateException("dedup index: " + n + " entries counted, " + (bb.position() - HEADER_SIZE) / ENTRY_SIZE + " found");
        }
        CRC32C crc = new CRC32C();
        crc.update(b, 0, b.length - 4);
        bb.putInt((int) crc.getValue());
        return b;
    }

    /** Decodes and validates a whole index file; any damage is a {@link FormatException} naming the file. */
    public static Contents decode(String name, byte[] b) throws FormatException {
        if (b.length < HEADER_SIZE + 4) {
            throw FormatException.at(name, "dedup index header", 0, "at least " + (HEADER_SIZE + 4) + " bytes", b.length + " bytes");
        }
        if (!Arrays.equals(b, 0, 8, MAGIC, 0, 8)) {
            throw FormatException.at(name, "dedup index magic", 0, "\"qdedupix\"", "other bytes");
        }
        long version = Be.u32(b, 8);
        if (version != VERSION) {
            throw FormatException.at(name, "dedup index version", 8, Integer.toString(VERSION), Long.toString(version));
        }
        long count = Be.u64(b, 56);
        if (count < 0 || count > (b.length - HEADER_SIZE - 4) / ENTRY_SIZE || HEADER_SIZE + count * ENTRY_SIZE + 4 != b.length) {
            throw FormatException.at(name, "dedup index entry count", 56, "a count matching the file size " + b.length, Long.toString(count));
        }
        CRC32C crc = new CRC32C();
        crc.update(b, 0, b.length - 4);
        if (crc.getValue() != Be.u32(b, b.length - 4)) {
            throw FormatException.at(name, "dedup index checksum", b.length - 4, Long.toHexString(crc.getValue()),
                    Long.toHexString(Be.u32(b, b.length - 4)));
        }
        int n = (int) count;
        int[] frags = new int[n];
        long[] clusters = new long[n];
        for (int i = 0; i < n; i++) {
            int off = HEADER_SIZE + ENTRY_SIZE * i;
            frags[i] = (int) Be.u32(b, off);
            clusters[i] = Be.u32(b, off + 4);
            if (i > 0 && clusters[i] <= clusters[i - 1]) {
                throw FormatException.at(name, "dedup index entry", off, "clusters in ascending order", "cluster " + clusters[i]
                        + " after " + clusters[i - 1]);
            }
        }
        return new Contents((int) Be.u32(b, 12), Be.u64(b, 16),
                new FileStamp(Be.u64(b, 24), Be.u64(b, 32), Be.u64(b, 40), Be.u64(b, 48)), frags, clusters);
    }

    /** Reads the index file, or null when there is none. */
    public static Contents read(Path path) throws IOException {
        byte[] b;
        try {
            long size = Files.size(path);
            if (size > Integer.MAX_VALUE - 16) {
                throw FormatException.at(path.toString(), "dedup index", 0, "a file under 2 GiB", size + " bytes");
            }
            b = Files.readAllBytes(path);
        } catch (NoSuchFileException e) {
            return null;
        }
        return decode(path.toString(), b);
    }

    /**
     * Replaces the index file: a temporary file renamed over the old one. Neither is synced: after a power cut the
     * file is the old one (an older generation), the new one, or a truncated or partly written one that fails its
     * size or checksum test, and each of those is either right or rebuilt (see docs/dedup-index.md).
     */
    public static void writeAtomically(Path path, byte[] data) throws IOException {
        Path dir = path.toAbsolutePath().getParent();
        Path tmp = dir.resolve(path.getFileName() + ".tmp");
        try (FileChannel ch = FileChannel.open(tmp, StandardOpenOption.CREATE, StandardOpenOption.TRUNCATE_EXISTING,
                StandardOpenOption.WRITE)) {
            ByteBuffer bb = ByteBuffer.wrap(data);
            while (bb.hasRemaining()) {
                ch.write(bb);
            }
        }
        try {
            Files.move(tmp, path, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
        } catch (AtomicMoveNotSupportedException e) {
            Files.deleteIfExists(tmp);
            throw e;
        }
    }

    /** Removes the index file (and a leftover temporary file), if any. */
    public static void delete(Path path) throws IOException {
        Files.deleteIfExists(path);
        Files.deleteIfExists(path.resolveSibling(path.getFileName() + ".tmp"));
    }
}
