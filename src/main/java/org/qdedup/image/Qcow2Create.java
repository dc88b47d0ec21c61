package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.qdedup.format.Be;
import org.qdedup.format.Features;
import org.qdedup.format.Geometry;
import org.qdedup.format.Header;
import org.qdedup.format.HeaderExtension;
import org.qdedup.io.BlockFile;
import org.qdedup.io.FileBlockFile;

/** Writes a new, empty qcow2 image: header, refcount table and blocks, L1 table, as qemu-img create lays them out. */
public final class Qcow2Create {
    private Qcow2Create() {
    }

    /** Validates options the way qemu-img create does; returns null or the problem. */
    public static String validate(CreateOptions o) {
        if (o.clusterBits() < Header.MIN_CLUSTER_BITS || o.clusterBits() > Header.MAX_CLUSTER_BITS) {
            return "cluster size must be a power of two between 512 and 2M";
        }
        if (o.version() != 2 && o.version() != 3) {
            return "compat must be 0.10 (v2) or 1.1 (v3)";
        }
        if (o.refcountOrder() < 0 || o.refcountOrder() > 6) {
            return "refcount_bits must be a power of two up to 64";
        }
        if (o.version() == 2) {
            if (o.refcountOrder() != 4) {
                return "different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)";
            }
            if (o.lazyRefcounts()) {
                return "lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)";
            }
            if (o.extendedL2()) {
                return "extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)";
            }
            if (o.compressionType() != 0) {
                return "compression_type requires compatibility level 1.1 and above (use compat=1.1 or greater)";
            }
            if (o.dataFile() != null) {
                return "data-file requires compat=1.1 or greater";
            }
        }
        if (o.extendedL2() && o.clusterBits() < 14) {
            return "extended L2 entries are only supported with cluster sizes of at least 16384 bytes";
        }
        if (o.dataFileRaw() && o.dataFile() == null) {
            return "data_file_raw requires data_file";
        }
        if (o.dataFile() != null && o.backingFile() != null && o.dataFileRaw()) {
            return "backing file and data_file_raw cannot be used together";
        }
        Geometry g = new Geometry(o.clusterBits(), o.extendedL2());
        if (o.size() < 0 || g.l1EntriesFor(o.size()) * 8 > Header.MAX_L1_BYTES) {
            return "image size too large for this cluster size (the L1 table is capped at 32 MiB: at most "
                    + (Header.MAX_L1_BYTES / 8 * g.bytesPerL2()) + " bytes)";
        }
        return null;
    }

    /** Creates the image file (truncating an existing one); backing and data file names are stored as given. */
    public static void create(String name, CreateOptions o) throws IOException {
        String err = validate(o);
        if (err != null) {
            throw new IOException(name + ": " + err);
        }
        try (FileBlockFile f = FileBlockFile.open(name, Path.of(name), true, FileBlockFile.Lock.EXCLUSIVE, true)) {
            write(f, o);
            f.flush();
        }
        if (o.dataFile() != null) {
            String df = Images.combine(name, o.dataFile());
            try (FileBlockFile d = FileBlockFile.open(df, Path.of(df), true, FileBlockFile.Lock.EXCLUSIVE, true)) {
                if (o.dataFileRaw()) {
                    d.truncate(o.size());
                }
                d.flush();
            }
        }
    }

    /** Lays out an empty image in {@code f}. */
    public static void write(BlockFile f, CreateOptions o) throws IOException {
        long cs = 1L << o.clusterBits();
        Geometry g = new Geometry(o.clusterBits(), o.extendedL2());
        long l1Entries = g.l1EntriesFor(o.size());
        long l1Clusters = Math.max(1, (l1Entries * 8 + cs - 1) / cs);
        long perBlock = cs * 8 / (1L << o.refcountOrder());
        // Header, refcount table, refcount blocks, L1: find block and table counts that cover all of them.
        long rb = 1, rt = 1;
        for (;;) {
            long total = 1 + rt + rb + l1Clusters;
            long nrb = (total + perBlock - 1) / perBlock;
            long nrt = Math.max(1, (nrb * 8 + cs - 1) / cs);
            if (nrb == rb && nrt == rt) {
                break;
            }
            rb = nrb;
            rt = nrt;
        }
        long rtOff = cs;
        long rbOff = rtOff + rt * cs;
        long l1Off = rbOff + rb * cs;
        long total = 1 + rt + rb + l1Clusters;

        long incompat = 0, autoclear = 0, compat = 0;
        if (o.version() == 3) {
            if (o.extendedL2()) {
                incompat |= Features.INCOMPAT_EXTL2;
            }
            if (o.compressionType() != 0) {
                incompat |= Features.INCOMPAT_COMPRESSION;
            }
            if (o.dataFile() != null) {
                incompat |= Features.INCOMPAT_DATA_FILE;
            }
            if (o.dataFileRaw()) {
                autoclear |= Features.AUTOCLEAR_DATA_FILE_RAW;
            }
            if (o.lazyRefcounts()) {
                compat |= Features.COMPAT_LAZY_REFCOUNTS;
            }
        }
        List<HeaderExtension> exts = new ArrayList<>();
        if (o.backingFormat() != null) {
            exts.add(new HeaderExtension(HeaderExtension.BACKING_FORMAT, o.backingFormat().getBytes(StandardCharsets.UTF_8)));
        }
        if (o.dataFile() != null) {
            exts.add(new HeaderExtension(HeaderExtension.DATA_FILE, o.dataFile().getBytes(StandardCharsets.UTF_8)));
        }
        if (o.version() == 3) {
            // QEMU leaves the feature name table out where it does not fit (512-byte clusters).
            HeaderExtension names = new HeaderExtension(HeaderExtension.FEATURE_NAMES, featureNames());
            int need = Header.V3_LENGTH + 8 + names.encodedLength()
                    + (o.backingFile() == null ? 0 : o.backingFile().getBytes(StandardCharsets.UTF_8).length);
            for (HeaderExtension e : exts) {
                need += e.encodedLength();
            }
            if (need <= 1L << o.clusterBits()) {
                exts.add(names);
            }
        }
        Header h = new Header(o.version(), 0, 0, o.clusterBits(), o.size(), 0, (int) l1Entries, l1Off, rtOff, (int) rt, 0, 0,
                incompat, compat, autoclear, o.version() == 3 ? o.refcountOrder() : 4,
                o.version() == 3 ? Header.V3_LENGTH : Header.V2_LENGTH, o.compressionType(), new byte[0], exts, o.backingFile());
        byte[] hdr = h.encode();
        int used = h.encodedLength();
        if (used > cs) {
            throw new IOException(f.name() + ": header, extensions and backing file name (" + used
                    + " bytes) do not fit in one " + cs + "-byte cluster");
        }
        f.truncate(0);
        f.write(ByteBuffer.wrap(hdr), 0);
        byte[] table = new byte[(int) (rt * cs)];
        for (int i = 0; i < rb; i++) {
            Be.put64(table, i * 8, rbOff + i * cs);
        }
        f.write(ByteBuffer.wrap(table), rtOff);
        byte[] blocks = new byte[(int) (rb * cs)];
        for (long c = 0; c < total; c++) {
            // The blocks are contiguous, so entry c of the whole run is entry c % perBlock of block c / perBlock.
            Refcounts.putEntry(blocks, (int) c, o.refcountOrder(), 1);
        }
        f.write(ByteBuffer.wrap(blocks), rbOff);
        f.write(ByteBuffer.wrap(new byte[(int) (l1Clusters * cs)]), l1Off);
    }


    /** The feature name table QEMU writes: (type, bit, 46-byte name) rows. */
    private static byte[] featureNames() {
        String[][] rows = {
                {"0", "0", "dirty bit"}, {"0", "1", "corrupt bit"}, {"0", "2", "external data file"},
                {"0", "3", "compression type"}, {"0", "4", "extended L2 entries"}, {"1", "0", "lazy refcounts"},
                {"2", "0", "bitmaps"}, {"2", "1", "raw external data"}};
        byte[] out = new byte[rows.length * 48];
        for (int i = 0; i < rows.length; i++) {
            out[i * 48] = (byte) Integer.parseInt(rows[i][0]);
            out[i * 48 + 1] = (byte) Integer.parseInt(rows[i][1]);
            byte[] n = rows[i][2].getBytes(StandardCharsets.US_ASCII);
            System.arraycopy(n, 0, out, i * 48 + 2, n.length);
        }
        return out;
    }
}
