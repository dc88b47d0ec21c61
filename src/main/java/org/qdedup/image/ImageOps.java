package org.qdedup.image;

import org.qdedup.io.Buffers;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import org.qdedup.format.L2Entry;
import org.qdedup.io.FileBlockFile;

/** Whole-image operations of qemu-img: resize, commit, rebase. */
public final class ImageOps {
    private ImageOps() {
    }

    // ---- dedup ------------------------------------------------------------------------------------------------

    /**
     * Enables online dedup on a qcow2 image: a header extension of ours records it, so every later write through
     * qdedup shares clusters. Images with an external data file cannot share clusters and are refused.
     */
    public static void enableDedup(String image) throws IOException {
        enableDedup(image, null);
    }

    /**
     * Enables dedup on an image (our header extension: format version, then the snapshot headroom).
     *
     * @param headroom snapshots that must still fit after sharing; null keeps the image's (1 when new)
     */
    public static void enableDedup(String image, Integer headroom) throws IOException {
        if (headroom != null && (headroom < 0 || headroom > org.qdedup.format.Header.MAX_DEDUP_HEADROOM)) {
            throw new IOException(image + ": dedup headroom " + headroom + " is outside 0.."
                    + org.qdedup.format.Header.MAX_DEDUP_HEADROOM);
        }
        try (ImageEditor ed = ImageEditor.open(image)) {
            if (ed.h.hasDataFile()) {
                throw new IOException(image + ": dedup needs clusters that can be shared; images with an external data "
                        + "file cannot share clusters");
            }
            int want = headroom != null ? headroom : ed.h.dedupHeadroom();
            if (!ed.h.dedup() || ed.h.dedupHeadroom() != want) {
                org.qdedup.format.Header nh = ed.h.withExtension(org.qdedup.format.Header.dedupExtension(want, 0));
                if (nh.encodedLength() > ed.cs) {
                    // The feature name table is optional (QEMU leaves it out where it does not fit either).
                    nh = nh.withoutExtension(org.qdedup.format.HeaderExtension.FEATURE_NAMES);
                }
                ed.writeHeader(nh);
            }
        }
    }

    // ---- resize ------------------------------------------------------------------------------------------------

    /** Resizes a raw or qcow2 image; shrinking needs {@code shrink} and drops what lies past the new end. */
    public static void resize(String image, long newSize, boolean shrink) throws IOException {
        String fmt;
        long oldSize;
        try (BlockDevice d = Images.open(image, OpenOptions.defaults())) {
            fmt = d.format();
            oldSize = d.size();
        }
        if (newSize < 0) {
            throw new IOException(image + ": new size must not be negative");
        }
        if (newSize < oldSize && !shrink) {
            throw new IOException(image + ": use the --shrink option to perform a shrink operation (this loses the data "
                    + "past the new end)");
        }
        if (fmt.equals("raw")) {
            try (FileBlockFile f = FileBlockFile.open(image, Path.of(image), true, FileBlockFile.Lock.EXCLUSIVE)) {
                if (newSize < f.size()) {
                    f.punchHole(newSize, f.size() - newSize);
                }
                f.truncate(newSize);
                f.truncate(newSize);
            }
            return;
        }
        if ((newSize & 511) != 0) {
            throw new IOException(image + ": the new size must be a multiple of 512 for qcow2 (found " + newSize + ")");
        }
        if (newSize < oldSize) {
            shrinkQcow2(image, newSize);
        } else if (newSize > oldSize) {
            growQcow2(image, newSize);
        }
    }

    private static void growQcow2(String image, long newSize) throws IOException {
        long oldSize;
        try (ImageEditor ed = ImageEditor.open(image)) {
            oldSize = ed.h.size();
            String err = Qcow2Create.validate(CreateOptions.defaults(newSize).withClusterBits(ed.bits)
                    .withExtendedL2(ed.h.extendedL2()));
            if (err != null) {
                throw new IOException(image + ": " + err);
            }
            int need = (int) ed.geo.l1EntriesFor(newSize);
            long l1Off = ed.h.l1TableOffset();
            int have = ed.h.l1Size();
            long haveClusters = (8L * have + ed.cs - 1) / ed.cs;
            if (need <= have || (8L * need + ed.cs - 1) / ed.cs <= haveClusters && have > 0) {
                ed.writeHeader(ed.h.withSize(newSize).withL1(l1Off, Math.max(need, have)));
            } else {
                long[] l1 = Arrays.copyOf(ed.activeL1(), need);
                long off = ed.allocateTable(8L * need);
                ed.writeTable(off, l1);
                ed.file.flush();
                ed.writeHeader(ed.h.withSize(newSize).withL1(off, need));
                ed.freeTable(l1Off, 8L * have);
                ed.giveBack();
            }
        }
        // A backing file longer than the old size must not show through the new area (as QEMU since 5.0: the new
        // range becomes zero clusters; v2 has none, so it gets explicit zeros, only as far as the backing file goes).
        try (Qcow2Image q = Images.openWritable(image, OpenOptions.defaults())) {
            BlockDevice b = q.backing();
            if (b != null && b.size() > oldSize) {
                long cs = q.header().clusterSize();
                long end = q.header().version() >= 3 ? newSize : Math.min(newSize, (b.size() + cs - 1) / cs * cs);
                q.writeZeroes(oldSize, end - oldSize, false);
            }
        }
    }

    private static void shrinkQcow2(String image, long newSize) throws IOException {
        long boundary;
        try (Qcow2Image q = Images.openWritable(image, OpenOptions.defaults())) {
            long cs = q.header().clusterSize();
            boundary = (newSize + cs - 1) / cs * cs;
            if (boundary > newSize) {
                // The tail of the last cluster must read as zeros should the image grow again (qemu-img 7.2 leaves
                // the old bytes there); a tail that already reads as zeros is left alone (no allocation).
                int n = (int) (Math.min(boundary, q.size()) - newSize);
                byte[] tail = new byte[n];
                q.read(ByteBuffer.wrap(tail), newSize);
                if (!Arrays.equals(tail, new byte[n])) {
                    q.writeZeroes(newSize, n, false);
                }
            }
        }
        try (ImageEditor ed = ImageEditor.open(image)) {
            long[] l1 = ed.activeL1();
            long perL2 = ed.geo.bytesPerL2();
            List<Long> drop = new ArrayList<>();
            for (int i = 0; i < l1.length; i++) {
                long l2 = l1[i] & L2Entry.L1_OFFSET_MASK;
                long start = i * perL2;
                if (l2 == 0 || start + perL2 <= boundary) {
                    continue;
                }
                long[] t = ed.readTable(l2, (int) (ed.cs / 8));
                int first = (int) (Math.max(0, boundary - start) / ed.cs);
                for (int j = first; j < ed.geo.l2Entries(); j++) {
                    int k = j * ed.step();
                    ed.clustersOf(t[k], drop);
                    t[k] = 0;
                    if (ed.step() == 2) {
                        t[k + 1] = 0;
                    }
                }
                if (first == 0) {
                    drop.add(l2 / ed.cs);
                    l1[i] = 0;
                } else if (ed.rc.get(l2 / ed.cs) == 1) {
                    ed.writeTable(l2, t);
                } else {
                    // Shared with a snapshot: the active layer gets its own shortened copy.
                    long copy = ed.allocateTable(ed.cs);
                    ed.writeTable(copy, t);
                    drop.add(l2 / ed.cs);
                    l1[i] = copy | L2Entry.COPIED;
                }
            }
            ed.file.flush();
            ed.writeTable(ed.h.l1TableOffset(), l1);
            ed.file.flush();
            // The L1 table keeps its size (as QEMU): entries past the end are zero, and its clusters stay referenced.
            ed.writeHeader(ed.h.withSize(newSize));
            ed.dropAll(drop);
            ed.syncRefcounts();
            ed.fixCopied();
            ed.giveBack();
        }
    }

    // ---- commit -------------------------------------------------------------------------------------------------

    /**
     * Writes the guest data an image holds above {@code base} (default: its backing file) into the base, then
     * empties the image unless {@code keep}. With an explicit base deeper down, the image is kept (as qemu-img).
     */
    public static void commit(String image, String base, boolean keep) throws IOException {
        String baseName;
        String baseFmt;
        int baseDepth = -1;
        long topSize;
        try (BlockDevice top = Images.open(image, new OpenOptions(null, true, null))) {
            List<BlockDevice> chain = Images.chain(top);
            if (chain.size() < 2) {
                throw new IOException(image + ": image does not have a backing file to commit into");
            }
            topSize = top.size();
            if (base == null) {
                baseDepth = 1;
            } else {
                Path want = Path.of(base).toRealPath();
                for (int i = 1; i < chain.size(); i++) {
                    if (Files.isSameFile(Path.of(chain.get(i).name()), want)) {
                        baseDepth = i;
                    }
                }
                if (baseDepth < 0) {
                    throw new IOException(image + ": '" + base + "' is not in the image's backing chain");
                }
                keep = true;
            }
            baseName = chain.get(baseDepth).name();
            baseFmt = chain.get(baseDepth).format();
        }
        long baseSize;
        try (BlockDevice b = Images.open(baseName, new OpenOptions(baseFmt, true, null))) {
            baseSize = b.size();
        }
        if (baseSize < topSize) {
            resize(baseName, topSize, false);
        }
        try (BlockDevice top = Images.open(image, new OpenOptions(null, true, null))) {
            if (baseFmt.equals("raw")) {
                try (FileBlockFile f = FileBlockFile.open(baseName, Path.of(baseName), true, FileBlockFile.Lock.EXCLUSIVE)) {
                    copyAbove(top, baseDepth, new org.qdedup.ops.Converter.Target() {
                        @Override
                        public void write(ByteBuffer b, long pos) throws IOException {
                            f.write(b, pos);
                        }

                        @Override
                        public void zero(long pos, long len) throws IOException {
                            if (!f.punchHole(pos, len)) {
                                f.write(ByteBuffer.allocate((int) len), pos);
                            }
                        }
                    });
                    f.flush();
                }
            } else {
                try (Qcow2Image b = Images.openWritable(baseName, new OpenOptions("qcow2", false, null))) {
                    copyAbove(top, baseDepth, new org.qdedup.ops.Converter.Target() {
                        @Override
                        public void write(ByteBuffer buf, long pos) throws IOException {
                            b.write(buf, pos);
                        }

                        @Override
                        public void zero(long pos, long len) throws IOException {
                            b.writeZeroes(pos, len, true);
                        }
                    });
                }
            }
        }
        if (!keep) {
            makeEmpty(image);
        }
    }

    /** Copies every range some layer above {@code baseDepth} holds into the sink. */
    private static void copyAbove(BlockDevice top, int baseDepth, org.qdedup.ops.Converter.Target sink) throws IOException {
        ByteBuffer buf = Buffers.direct(1 << 20);
        long size = top.size();
        for (long pos = 0; pos < size; ) {
            ChainStatus.Entry e = ChainStatus.entry(top, pos, Math.min(1 << 20, size - pos));
            long len = e.length();
            if (e.depth() < baseDepth && e.present()) {
                if (e.zero() && !e.data()) {
                    sink.zero(pos, len);
                } else {
                    buf.clear().limit((int) len);
                    top.read(buf, pos);
                    buf.flip();
                    sink.write(buf, pos);
                }
            }
            pos += len;
        }
    }

    /** Drops every cluster of the active layer: it then reads through to its backing file. */
    public static void makeEmpty(String image) throws IOException {
        try (ImageEditor ed = ImageEditor.open(image)) {
            long[] l1 = ed.activeL1();
            List<Long> drop = ed.referencesOf(l1);
            ed.writeTable(ed.h.l1TableOffset(), new long[l1.length]);
            ed.file.flush();
            ed.dropAll(drop);
            ed.giveBack();
        }
    }

    // ---- rebase -------------------------------------------------------------------------------------------------

    /**
     * Changes the backing file. Safe mode (not {@code unsafe}) first copies into the image every range it does not
     * hold whose content differs between the old and the new backing file, so the guest sees the same bytes.
     *
     * @param backing the new backing file name as stored (relative to the image's directory), or null/"" for none
     */
    public static void rebase(String image, String backing, String format, boolean unsafe) throws IOException {
        String name = backing == null || backing.isEmpty() ? null : backing;
        if (name != null && format == null) {
            throw new IOException(image + ": rebase needs the backing format (-F raw or -F qcow2)");
        }
        if (!unsafe) {
            BlockDevice nb = name == null ? null
                    : Images.open(Images.combine(image, name), new OpenOptions(format, true, null));
            try (Qcow2Image q = Images.openWritable(image, OpenOptions.defaults())) {
                long cs = q.header().clusterSize();
                long size = q.size();
                byte[] oldView = new byte[(int) cs];
                byte[] newView = new byte[(int) cs];
                for (long pos = 0; pos < size; pos += cs) {
                    int n = (int) Math.min(cs, size - pos);
                    LayerStatus st = q.status(pos, n);
                    if ((st.has(LayerStatus.DATA) || st.has(LayerStatus.ZERO)) && st.length() >= n) {
                        continue; // the image holds the whole cluster: the backing file does not show through
                    }
                    q.read(ByteBuffer.wrap(oldView, 0, n), pos);
                    Arrays.fill(newView, (byte) 0);
                    if (nb != null && pos < nb.size()) {
                        nb.read(ByteBuffer.wrap(newView, 0, (int) Math.min(n, nb.size() - pos)), pos);
                    }
                    if (!Arrays.equals(oldView, 0, n, newView, 0, n)) {
                        q.write(ByteBuffer.wrap(oldView, 0, n), pos);
                    }
                }
            } finally {
                if (nb != null) {
                    nb.close();
                }
            }
        }
        try (ImageEditor ed = ImageEditor.open(image)) {
            ed.writeHeader(ed.h.withBacking(name, name == null ? null : format));
        }
    }
}
