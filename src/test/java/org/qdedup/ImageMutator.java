package org.qdedup;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import org.qdedup.format.Be;
import org.qdedup.format.Header;
import org.qdedup.format.HeaderExtension;

/**
 * Structure-aware mutations of a valid qcow2 image: the seed is parsed once into the places worth hitting
 * (header fields, extensions, L1/L2 entries, refcount table and blocks, snapshot entries, compressed descriptors,
 * the backing file name), and each mutation changes one of them to a value chosen to sit on a boundary: zero,
 * all ones, off by one, unaligned, past the end of the file, another table's offset, a flag bit flipped. Random
 * byte flips, truncations and growth are mixed in. Pure: the same seed image and {@link Random} give the same bytes.
 */
final class ImageMutator {
    private static final long OFFSET_MASK = 0x00ff_ffff_ffff_fe00L;

    /** An integer field of the image: where it is, how wide (bytes), and what it is (for the mutation log). */
    record Field(String what, int offset, int width) {
    }

    /** A valid image and its parsed layout. */
    static final class Seed {
        final String name;
        final byte[] bytes;
        final int clusterBits;
        final boolean extendedL2;
        final int version;
        final List<Field> header = new ArrayList<>();
        final List<Field> extensions = new ArrayList<>();
        final List<Field> l1 = new ArrayList<>();
        final List<Field> l2 = new ArrayList<>();
        final List<Field> compressed = new ArrayList<>();
        final List<Field> refcountTable = new ArrayList<>();
        final List<Field> refcountBlocks = new ArrayList<>();
        final List<Field> snapshots = new ArrayList<>();
        /** Offsets of the metadata tables: values an offset field is set to, to make two structures overlap. */
        final List<Long> tableOffsets = new ArrayList<>();
        final int backingNameOffset;

        Seed(String name, byte[] bytes) throws Exception {
            this.name = name;
            this.bytes = bytes;
            Header h = Header.decode(name, Arrays.copyOf(bytes, (int) Math.min(bytes.length, 1 << Be.u32(bytes, 20))), bytes.length);
            clusterBits = h.clusterBits();
            extendedL2 = h.extendedL2();
            version = h.version();
            String[] names = {"magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
                    "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
                    "nb_snapshots", "snapshots_offset", "incompatible_features", "compatible_features",
                    "autoclear_features", "refcount_order", "header_length", "compression_type"};
            int[][] at = {{0, 4}, {4, 4}, {8, 8}, {16, 4}, {20, 4}, {24, 8}, {32, 4}, {36, 4}, {40, 8}, {48, 8}, {56, 4},
                    {60, 4}, {64, 8}, {72, 8}, {80, 8}, {88, 8}, {96, 4}, {100, 4}, {104, 1}};
            for (int i = 0; i < names.length; i++) {
                if (at[i][0] + at[i][1] <= h.headerLength()) {
                    header.add(new Field("header " + names[i], at[i][0], at[i][1]));
                }
            }
            int pos = h.headerLength();
            for (HeaderExtension e : h.extensions()) {
                String t = String.format("extension 0x%08x", e.type());
                extensions.add(new Field(t + " type", pos, 4));
                extensions.add(new Field(t + " length", pos + 4, 4));
                for (int b = 0; b < Math.min(e.data().length, 32); b += 4) {
                    if (b + 4 <= e.data().length) {
                        extensions.add(new Field(t + " data+" + b, pos + 8 + b, 4));
                    }
                }
                pos += e.encodedLength();
            }
            extensions.add(new Field("extension end marker", pos, 8));
            backingNameOffset = (int) h.backingFileOffset();
            long cs = h.clusterSize();
            tableOffsets.add(0L);
            tableOffsets.add(h.l1TableOffset());
            tableOffsets.add(h.refcountTableOffset());
            if (h.nbSnapshots() > 0) {
                tableOffsets.add(h.snapshotsOffset());
            }
            int step = extendedL2 ? 16 : 8;
            for (int i = 0; i < h.l1Size(); i++) {
                int e = (int) h.l1TableOffset() + 8 * i;
                l1.add(new Field("L1 entry " + i, e, 8));
                long l2At = Be.u64(bytes, e) & OFFSET_MASK;
                if (l2At == 0 || l2At + cs > bytes.length) {
                    continue;
                }
                tableOffsets.add(l2At);
                for (int j = 0; j < cs / step; j++) {
                    int le = (int) l2At + j * step;
                    long v = Be.u64(bytes, le);
                    if (v == 0 && (!extendedL2 || Be.u64(bytes, le + 8) == 0)) {
                        continue;
                    }
                    l2.add(new Field("L2 entry " + j + " of L1 " + i, le, 8));
                    if (extendedL2) {
                        l2.add(new Field("L2 bitmap " + j + " of L1 " + i, le + 8, 8));
                    }
                    if ((v & (1L << 62)) != 0) {
                        compressed.add(new Field("compressed descriptor " + j + " of L1 " + i, le, 8));
                    }
                }
            }
            for (int i = 0; i < h.refcountTableClusters() * cs / 8; i++) {
                int e = (int) h.refcountTableOffset() + 8 * i;
                long b = Be.u64(bytes, e);
                if (b == 0 || b + cs > bytes.length) {
                    continue;
                }
                refcountTable.add(new Field("refcount table entry " + i, e, 8));
                tableOffsets.add(b);
                int width = Math.max(1, h.refcountBits() / 8);
                for (int k = 0; k < 8; k++) {
                    refcountBlocks.add(new Field("refcount block " + i + " entry " + k, (int) b + k * width, width));
                }
            }
            int sp = (int) h.snapshotsOffset();
            for (int s = 0; s < h.nbSnapshots(); s++) {
                String t = "snapshot " + s + " ";
                snapshots.add(new Field(t + "l1_table_offset", sp, 8));
                snapshots.add(new Field(t + "l1_size", sp + 8, 4));
                snapshots.add(new Field(t + "id_str_size", sp + 12, 2));
                snapshots.add(new Field(t + "name_size", sp + 14, 2));
                snapshots.add(new Field(t + "vm_state_size", sp + 32, 4));
                snapshots.add(new Field(t + "extra_data_size", sp + 36, 4));
                long extra = Be.u32(bytes, sp + 36);
                if (extra >= 16) {
                    snapshots.add(new Field(t + "vm_state_size_large", sp + 40, 8));
                    snapshots.add(new Field(t + "disk_size", sp + 48, 8));
                }
                long l1 = Be.u64(bytes, sp);
                tableOffsets.add(l1);
                long l1n = Be.u32(bytes, sp + 8);
                for (int i = 0; i < Math.min(l1n, 4); i++) {
                    snapshots.add(new Field(t + "L1 entry " + i, (int) l1 + 8 * i, 8));
                }
                sp += (int) ((40 + extra + Be.u16(bytes, sp + 12) + Be.u16(bytes, sp + 14) + 7) & ~7L);
            }
        }
    }

    /** Names a mutated image can give as its backing file: itself, a loop, missing, too long, odd paths. */
    static final String[] BACKING_NAMES = {"fuzz.qcow2", "loop.qcow2", "missing.qcow2", "base.qcow2", "base.raw",
            "data.raw", "", ".", "/", "/dev/null", "../" + "x".repeat(200), "x".repeat(1023), "x".repeat(1024), "base.qcow2\0junk"};

    /** Backing formats to put in the backing format extension. */
    static final String[] BACKING_FORMATS = {"qcow2", "raw", "vmdk", "", "qcow2\0", "QCOW2"};

    private ImageMutator() {
    }

    /** One mutated image: its bytes and what was done to it. */
    record Mutant(byte[] bytes, List<String> log) {
    }

    static Mutant mutate(Seed seed, Random r) {
        byte[] b = seed.bytes.clone();
        List<String> log = new ArrayList<>();
        int n = 1 + (r.nextInt(3) == 0 ? r.nextInt(3) : 0);
        for (int i = 0; i < n; i++) {
            b = mutateOnce(seed, b, r, log);
        }
        return new Mutant(b, log);
    }

    private static byte[] mutateOnce(Seed s, byte[] b, Random r, List<String> log) {
        int kind = r.nextInt(100);
        List<Field> pool;
        if (kind < 22) {
            pool = s.header;
        } else if (kind < 30) {
            pool = s.extensions;
        } else if (kind < 40) {
            pool = s.l1;
        } else if (kind < 54) {
            pool = s.l2;
        } else if (kind < 60) {
            pool = s.compressed;
        } else if (kind < 65) {
            pool = s.refcountTable;
        } else if (kind < 70) {
            pool = s.refcountBlocks;
        } else if (kind < 78) {
            pool = s.snapshots;
        } else if (kind < 82) {
            return backingName(s, b, r, log);
        } else if (kind < 84) {
            return backingFormat(s, b, r, log);
        } else if (kind < 92) {
            int flips = 1 + r.nextInt(8);
            // Most flips land in the first clusters, where the metadata is.
            int span = r.nextBoolean() ? Math.min(b.length, 4 << s.clusterBits) : b.length;
            for (int i = 0; i < flips && span > 0; i++) {
                int at = r.nextInt(span);
                b[at] ^= (byte) (1 << r.nextInt(8));
                log.add("bit flip at " + at);
            }
            return b;
        } else if (kind < 97) {
            int len = switch (r.nextInt(3)) {
                case 0 -> r.nextInt(b.length + 1);
                case 1 -> (int) s.tableOffsets.get(r.nextInt(s.tableOffsets.size())).longValue() + r.nextInt(64);
                default -> b.length - 1 - r.nextInt(Math.min(b.length, 4096));
            };
            len = Math.max(0, Math.min(b.length, len));
            log.add("truncated to " + len);
            return Arrays.copyOf(b, len);
        } else {
            int grow = r.nextInt(3 << s.clusterBits);
            byte[] g = Arrays.copyOf(b, b.length + grow);
            for (int i = b.length; i < g.length; i += 1 + r.nextInt(64)) {
                g[i] = (byte) r.nextInt();
            }
            log.add("grown by " + grow);
            return g;
        }
        if (pool.isEmpty()) {
            pool = s.header;
        }
        Field f = pool.get(r.nextInt(pool.size()));
        if (f.offset() + f.width() > b.length) {
            return b;
        }
        long old = get(b, f);
        long v = pool == s.l1 || pool == s.l2 || pool == s.refcountTable || (f.what().contains("L1 entry"))
                ? entryValue(s, b, old, r) : pool == s.compressed ? compressedValue(s, b, old, r) : value(s, b, f, old, r);
        put(b, f, v);
        log.add(String.format("%s at %d: 0x%x -> 0x%x", f.what(), f.offset(), old, v));
        return b;
    }

    /** A boundary value for an integer field. */
    private static long value(Seed s, byte[] b, Field f, long old, Random r) {
        long cs = 1L << s.clusterBits;
        long mask = f.width() == 8 ? -1L : (1L << (8 * f.width())) - 1;
        long v = switch (r.nextInt(14)) {
            case 0 -> 0;
            case 1 -> 1;
            case 2 -> -1L;
            case 3 -> old + 1;
            case 4 -> old - 1;
            case 5 -> old ^ (1L << r.nextInt(8 * f.width()));
            case 6 -> 1L << r.nextInt(8 * f.width());
            case 7 -> r.nextLong();
            case 8 -> b.length;
            case 9 -> (b.length + cs - 1) / cs * cs + cs * r.nextInt(4);
            case 10 -> s.tableOffsets.get(r.nextInt(s.tableOffsets.size()));
            case 11 -> old * 2 + r.nextInt(3);
            case 12 -> old + 8 * (r.nextInt(17) - 8);
            default -> (1L << r.nextInt(8 * f.width())) - 1;
        };
        return v & mask;
    }

    /** A new L1 / L2 / refcount table entry: offsets moved or aimed at other tables, flags and reserved bits flipped. */
    private static long entryValue(Seed s, byte[] b, long old, Random r) {
        long cs = 1L << s.clusterBits;
        return switch (r.nextInt(12)) {
            case 0 -> old ^ (1L << 63); // COPIED
            case 1 -> old ^ (1L << 62); // COMPRESSED (L2)
            case 2 -> old ^ 1; // ZERO (L2), reserved elsewhere
            case 3 -> old | (1L << (1 + r.nextInt(8))); // reserved low bits
            case 4 -> old | (1L << (56 + r.nextInt(6))); // reserved high bits
            case 5 -> (old & ~OFFSET_MASK) | s.tableOffsets.get(r.nextInt(s.tableOffsets.size()));
            case 6 -> (old & ~OFFSET_MASK) | ((b.length + cs - 1) / cs * cs + cs * r.nextInt(4));
            case 7 -> (old & ~OFFSET_MASK) | ((old & OFFSET_MASK) + 512 * (1 + r.nextInt(8)));
            case 8 -> (old & ~OFFSET_MASK) | (r.nextLong() & OFFSET_MASK);
            case 9 -> 0;
            case 10 -> r.nextLong();
            default -> old & ~OFFSET_MASK;
        };
    }

    /** A compressed cluster descriptor with its host offset or sector count changed. */
    private static long compressedValue(Seed s, byte[] b, long old, Random r) {
        int x = 62 - (s.clusterBits - 8);
        long offMask = (1L << x) - 1;
        long sectorMask = ((1L << 62) - 1) & ~offMask;
        long off = old & offMask;
        long sectors = (old & sectorMask) >>> x;
        switch (r.nextInt(8)) {
            case 0 -> sectors = 0;
            case 1 -> sectors = (sectorMask >>> x);
            case 2 -> sectors = sectors + 1 + r.nextInt(4);
            case 3 -> off = b.length - r.nextInt(600);
            case 4 -> off = b.length + r.nextInt(1 << 20);
            case 5 -> off = off + 1 + r.nextInt(64);
            case 6 -> off = s.tableOffsets.get(r.nextInt(s.tableOffsets.size()));
            default -> off = Math.max(0, off - 1 - r.nextInt(64));
        }
        return (old & ~((1L << 62) - 1)) | ((sectors << x) & sectorMask) | (off & offMask);
    }

    /** Rewrites the backing file name (where it is, or right after the extensions) and its size field. */
    private static byte[] backingName(Seed s, byte[] b, Random r, List<String> log) {
        String name = BACKING_NAMES[r.nextInt(BACKING_NAMES.length)];
        byte[] nb = name.getBytes(StandardCharsets.UTF_8);
        int at = s.backingNameOffset != 0 ? s.backingNameOffset : s.extensions.getLast().offset() + 8;
        int size = r.nextInt(6) == 0 ? r.nextInt(2048) : nb.length;
        if (b.length < 20 || at + nb.length > b.length || at + nb.length > (1 << s.clusterBits)) {
            return b;
        }
        System.arraycopy(nb, 0, b, at, nb.length);
        Be.put64(b, 8, at);
        Be.put32(b, 16, size);
        log.add("backing file name '" + (name.length() > 20 ? name.substring(0, 20) + "..." : name) + "' (size " + size + ")");
        return b;
    }

    /** Rewrites the backing format extension's payload in place (same length field, so the chain of extensions holds). */
    private static byte[] backingFormat(Seed s, byte[] b, Random r, List<String> log) {
        for (Field f : s.extensions) {
            if (f.what().equals(String.format("extension 0x%08x type", HeaderExtension.BACKING_FORMAT))) {
                String fmt = BACKING_FORMATS[r.nextInt(BACKING_FORMATS.length)];
                byte[] fb = fmt.getBytes(StandardCharsets.UTF_8);
                int len = (int) Be.u32(b, f.offset() + 4);
                int room = (len + 7) & ~7;
                if (fb.length > room || f.offset() + 8 + room > b.length) {
                    return b;
                }
                Arrays.fill(b, f.offset() + 8, f.offset() + 8 + room, (byte) 0);
                System.arraycopy(fb, 0, b, f.offset() + 8, fb.length);
                // Same padded length, so the extensions after it stay where they are.
                Be.put32(b, f.offset() + 4, ((fb.length + 7) & ~7) == room ? fb.length : room);
                log.add("backing format '" + fmt.replace("\0", "\\0") + "'");
                return b;
            }
        }
        return b;
    }

    private static long get(byte[] b, Field f) {
        long v = 0;
        for (int i = 0; i < f.width(); i++) {
            v = (v << 8) | (b[f.offset() + i] & 0xff);
        }
        return v;
    }

    private static void put(byte[] b, Field f, long v) {
        for (int i = f.width() - 1; i >= 0; i--) {
            b[f.offset() + i] = (byte) v;
            v >>>= 8;
        }
    }
}
