package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import org.qdedup.format.Be;
import org.qdedup.format.FormatException;
import org.qdedup.format.Features;
import org.qdedup.format.Geometry;
import org.qdedup.format.Header;
import org.qdedup.format.Snapshot;
import org.qdedup.io.BlockFile;
import org.qdedup.io.FileBlockFile;

/** Opens images read-only: probes the format, validates the header and tables, resolves backing chains. */
public final class Images {
    /** QEMU's limit on backing chain depth is far higher; we cap at 64 to bound recursion and open files. */
    public static final int MAX_CHAIN_DEPTH = 64;

    private Images() {
    }

    /** Opens an image and its whole backing chain for reading. */
    public static BlockDevice open(String name, OpenOptions opts) throws IOException {
        return open(name, Path.of(name), opts, 0, new HashSet<>(), false);
    }

    /**
     * Opens a qcow2 image for reading and writing (exclusive lock, QEMU-compatible); its backing chain is opened
     * read-only.
     */
    public static Qcow2Image openWritable(String name, OpenOptions opts) throws IOException {
        if (opts.snapshotName() != null) {
            throw new IOException(name + ": a snapshot cannot be opened for writing");
        }
        BlockDevice d = open(name, Path.of(name), opts, 0,
                new HashSet<>(), true);
        if (!(d instanceof Qcow2Image q)) {
            d.close();
            throw new IOException(name + ": only qcow2 images can be opened for writing here (found " + d.format() + ")");
        }
        return attachWriter(q);
    }

    /**
     * Opens a qcow2 image held in any {@link BlockFile} (in memory, power-cut, ...) for writing; a backing file is
     * resolved by name as usual.
     */
    public static Qcow2Image openWritable(BlockFile file) throws IOException {
        return attachWriter((Qcow2Image) openQcow2(file.name(), file, OpenOptions.defaults(), 0, new HashSet<>(), true));
    }

    /** Opens a qcow2 image held in any {@link BlockFile} for reading. */
    public static Qcow2Image openReadOnly(BlockFile file) throws IOException {
        return (Qcow2Image) openQcow2(file.name(), file, OpenOptions.defaults(), 0, new HashSet<>(), false);
    }

    private static Qcow2Image attachWriter(Qcow2Image q) throws IOException {
        q.writer(new Qcow2Writer(q));
        return q;
    }

    /**
     * QEMU's path_combine: a relative name is taken relative to the directory of the referring image's name.
     */
    public static String combine(String referrer, String name) {
        if (name.startsWith("/")) {
            return name;
        }
        int slash = referrer.lastIndexOf('/');
        return slash < 0 ? name : referrer.substring(0, slash + 1) + name;
    }

    /** Reads the first bytes and says whether the file is qcow2 (by its magic). */
    public static boolean looksLikeQcow2(BlockFile f) throws IOException {
        byte[] magic = new byte[4];
        int n = f.read(ByteBuffer.wrap(magic), 0);
        return n == 4 && (int) Be.u32(magic, 0) == Header.MAGIC;
    }

    private static BlockDevice open(String name, Path path, OpenOptions opts, int depth, Set<Path> seen, boolean writable)
            throws IOException {
        if (depth > MAX_CHAIN_DEPTH) {
            throw FormatException.of(name, "backing chain deeper than " + MAX_CHAIN_DEPTH + " images");
        }
        if (!Files.exists(path)) {
            throw new IOException(name + ": no such file");
        }
        if (Files.isDirectory(path)) {
            throw new IOException(name + ": is a directory");
        }
        Path real = path.toRealPath();
        if (!seen.add(real)) {
            throw FormatException.of(name, "backing file loop: " + real + " is already in the chain");
        }
        FileBlockFile file = FileBlockFile.open(name, path, writable, writable ? FileBlockFile.Lock.EXCLUSIVE
                : opts.forceShare() ? FileBlockFile.Lock.NONE : FileBlockFile.Lock.SHARED);
        try {
            String format = opts.format();
            if (format == null) {
                format = looksLikeQcow2(file) ? "qcow2" : "raw";
            }
            return switch (format) {
                case "raw" -> {
                    if (opts.snapshotName() != null) {
                        throw new IOException(name + ": raw images have no snapshots");
                    }
                    yield new RawImage(file);
                }
                case "qcow2" -> openQcow2(name, file, opts, depth, seen, writable);
                default -> throw new IOException(name + ": unknown format '" + format + "' (expected raw or qcow2)");
            };
        } catch (IOException | RuntimeException e) {
            file.close();
            throw e;
        }
    }

    /** Reads and validates the header of an open qcow2 file. */
    /**
     * Clears our "dedup index in sync" autoclear bit, synced, if it is set: done before anything but our own writer
     * changes a dedup image (offline edits, repairs), so the index file is rebuilt rather than trusted.
     */
    static void clearDedupIndexBit(BlockFile file) throws IOException {
        Header h = readHeader(file, true);
        if ((h.autoclearFeatures() & Features.AUTOCLEAR_DEDUP_INDEX) != 0) {
            writeHeader(file, h.withAutoclear(h.autoclearFeatures() & ~Features.AUTOCLEAR_DEDUP_INDEX));
            file.flush();
        }
    }

    public static Header readHeader(BlockFile file) throws IOException {
        return readHeader(file, false);
    }

    /** Reads the header; with {@code allowPastEof} its tables may run past the end of a truncated file. */
    public static Header readHeader(BlockFile file, boolean allowPastEof) throws IOException {
        long fsize = file.size();
        byte[] start = new byte[(int) Math.min(fsize, Header.V3_LENGTH)];
        file.read(ByteBuffer.wrap(start), 0);
        int bits = Header.peekClusterBits(file.name(), start);
        byte[] cluster = new byte[(int) Math.min(fsize, 1L << bits)];
        file.read(ByteBuffer.wrap(cluster), 0);
        return Header.decode(file.name(), cluster, fsize, allowPastEof);
    }

    /** Reads {@code count} big-endian 64-bit entries at {@code offset} (bounds already validated). */
    public static long[] readTable(BlockFile file, long offset, int count) throws IOException {
        byte[] raw = new byte[count * 8];
        file.readFully(ByteBuffer.wrap(raw), offset);
        long[] t = new long[count];
        for (int i = 0; i < count; i++) {
            t[i] = Be.u64(raw, i * 8);
        }
        return t;
    }

    /** Writes a header (with its extensions and backing file name) over the first cluster; the caller syncs. */
    public static void writeHeader(BlockFile file, Header h) throws IOException {
        if (h.encodedLength() > h.clusterSize()) {
            throw new IOException(file.name() + ": header, extensions and backing file name (" + h.encodedLength()
                    + " bytes) do not fit in one " + h.clusterSize() + "-byte cluster");
        }
        file.write(ByteBuffer.wrap(h.encode()), 0);
    }

    /** Writes big-endian 64-bit entries at {@code offset}. */
    public static void writeTable(BlockFile file, long offset, long[] t) throws IOException {
        byte[] raw = new byte[t.length * 8];
        for (int i = 0; i < t.length; i++) {
            Be.put64(raw, i * 8, t[i]);
        }
        file.write(ByteBuffer.wrap(raw), offset);
    }

    /** Reads and validates the snapshot table. */
    public static List<Snapshot> readSnapshots(BlockFile file, Header h) throws IOException {
        return readSnapshots(file, h, false);
    }

    /** With {@code unchecked}, snapshot L1 tables are not validated (check reports them one by one). */
    public static List<Snapshot> readSnapshots(BlockFile file, Header h, boolean unchecked) throws IOException {
        if (h.nbSnapshots() == 0) {
            return List.of();
        }
        long fsize = file.size();
        long avail = Math.min(Snapshot.MAX_TABLE_BYTES, fsize - h.snapshotsOffset());
        // Each entry takes at least 40 bytes: refuse a count that cannot fit before reading anything.
        if ((long) h.nbSnapshots() * 40 > avail) {
            throw FormatException.at(file.name(), "qcow2 header nb_snapshots", 60,
                    "at most " + (avail / 40) + " entries in the " + avail + " bytes after the snapshot table offset",
                    Integer.toString(h.nbSnapshots()));
        }
        // Read what the entries need, not all of the (up to 64 MiB) space after the offset: start small and grow.
        int len = (int) Math.min(avail, Math.max(64L << 10, h.nbSnapshots() * 128L));
        byte[] raw;
        for (;;) {
            raw = new byte[len];
            file.readFully(ByteBuffer.wrap(raw), h.snapshotsOffset());
            long need = snapshotTableBytes(raw, h.nbSnapshots());
            if (need <= len || len == avail) {
                break;
            }
            len = (int) Math.min(avail, Math.max(need, 2L * len));
        }
        return Snapshot.decodeTable(file.name(), raw, h.snapshotsOffset(), h.nbSnapshots(), h.clusterSize(), fsize,
                unchecked ? -1 : Header.MAX_L1_BYTES / 8);
    }

    /**
     * Bytes the first {@code count} snapshot entries take, as far as {@code raw} shows: its length or less when they
     * fit (or an entry is bad, which decoding reports), else a lower bound on the bytes needed.
     */
    private static long snapshotTableBytes(byte[] raw, int count) {
        long pos = 0;
        for (int i = 0; i < count; i++) {
            if (pos + 40 > raw.length) {
                return pos + 40;
            }
            int p = (int) pos;
            long extra = Be.u32(raw, p + 36);
            if (extra > 1024) {
                return pos;
            }
            long end = pos + 40 + extra + Be.u16(raw, p + 12) + Be.u16(raw, p + 14);
            if (end > raw.length) {
                return end;
            }
            pos = (end + 7) & ~7L;
        }
        return Math.min(pos, raw.length);
    }

    private static BlockDevice openQcow2(String name, BlockFile file, OpenOptions opts, int depth, Set<Path> seen,
                                         boolean writable) throws IOException {
        Header h = readHeader(file);
        if (writable && h.corrupt()) {
            // As QEMU: a corrupt image opens read-only or for check -r, never for writing (and nothing is repaired here).
            throw FormatException.of(name, "image is marked corrupt (incompatible feature bit 1 at offset 72); repair it with "
                    + "'qdedup check -r all' before writing");
        }
        List<Snapshot> snaps = readSnapshots(file, h);
        long l1Offset = h.l1TableOffset();
        int l1Size = h.l1Size();
        long size = wholeSectors(h.size());
        if (opts.snapshotName() != null) {
            Snapshot s = null;
            for (Snapshot c : snaps) {
                if (c.name().equals(opts.snapshotName())) {
                    s = c;
                }
            }
            if (s == null) {
                throw new IOException(name + ": no snapshot named '" + opts.snapshotName() + "'");
            }
            l1Offset = s.l1TableOffset();
            l1Size = s.l1Size();
            if (s.diskSize() >= 0) {
                size = wholeSectors(s.diskSize());
            }
            long need = new Geometry(h.clusterBits(), h.extendedL2()).l1EntriesFor(size);
            if (l1Size < need) {
                throw FormatException.of(name, "snapshot '" + s.name() + "' L1 table has " + l1Size
                        + " entries, expected at least " + need + " for its disk size " + size);
            }
        }
        long[] l1 = readTable(file, l1Offset, l1Size);
        BlockFile dataFile = file;
        BlockDevice backing = null;
        try {
            if (h.hasDataFile()) {
                String df = h.dataFile();
                if (df == null) {
                    throw FormatException.of(name, "external data file feature bit set but no data file name extension");
                }
                String dfName = combine(name, df);
                dataFile = FileBlockFile.open(dfName, Path.of(dfName), writable, writable ? FileBlockFile.Lock.EXCLUSIVE
                        : opts.forceShare() ? FileBlockFile.Lock.NONE : FileBlockFile.Lock.SHARED);
            }
            if (h.backingFile() != null) {
                String bName = combine(name, h.backingFile());
                String bFmt = h.backingFormat();
                if (bFmt != null && !bFmt.equals("raw") && !bFmt.equals("qcow2")) {
                    throw FormatException.of(name, "backing file format '" + bFmt + "' is not supported (raw or qcow2)");
                }
                if (depth >= MAX_CHAIN_DEPTH) {
                    throw FormatException.at(name, "backing file name", h.backingFileOffset(),
                            "a backing chain of at most " + MAX_CHAIN_DEPTH + " images below the top one",
                            "'" + h.backingFile() + "' at depth " + (depth + 1));
                }
                backing = open(bName, Path.of(bName), new OpenOptions(bFmt, opts.forceShare(), null), depth + 1, seen, false);
            }
            if (writable && h.dirty()) {
                // Not closed cleanly with lazy refcounts: rebuild the refcounts before any write (as QEMU does), once
                // everything else has been validated, so an image refused for another reason is left as it was.
                Check.Result r;
                try {
                    r = Check.run(file, Check.Fix.ALL, new java.io.PrintStream(java.io.OutputStream.nullOutputStream()));
                } catch (IOException e) {
                    // The repair has begun writing (as QEMU's does): say so, not just "File too large".
                    throw FormatException.of(name, "image was not closed cleanly and its repair failed (" + e.getMessage()
                            + "); run 'qdedup check -r all' for details");
                }
                if (r.corruptions > 0 || r.checkErrors > 0) {
                    throw FormatException.of(name, "image was not closed cleanly and its repair failed (" + r.corruptions
                            + " corruptions left); run 'qdedup check -r all' for details");
                }
                h = readHeader(file);
                snaps = readSnapshots(file, h);
                l1Offset = h.l1TableOffset();
                l1 = readTable(file, l1Offset, h.l1Size());
                size = wholeSectors(h.size());
            }
            return new Qcow2Image(file, dataFile, h, l1Offset, l1, size, backing, snaps);
        } catch (IOException | RuntimeException e) {
            if (backing != null) {
                backing.close();
            }
            if (dataFile != file) {
                dataFile.close();
            }
            throw e;
        }
    }

    /** QEMU counts a qcow2 image's virtual size in whole 512-byte sectors: a size field of 8 MiB + 1 reads as 8 MiB. */
    private static long wholeSectors(long bytes) {
        return bytes & ~511L;
    }

    /** The chain from the top image down, for info --backing-chain. */
    public static List<BlockDevice> chain(BlockDevice top) {
        List<BlockDevice> out = new ArrayList<>();
        for (BlockDevice d = top; d != null; d = d.backing()) {
            out.add(d);
        }
        return out;
    }
}
