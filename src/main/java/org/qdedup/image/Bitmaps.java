package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import org.qdedup.format.Be;
import org.qdedup.format.FormatException;
import org.qdedup.format.Header;
import org.qdedup.format.HeaderExtension;
import org.qdedup.io.BlockFile;

/** Persistent dirty bitmaps (qcow2 bitmaps extension): only as far as needed to free them. */
final class Bitmaps {
    private Bitmaps() {
    }

    /** QEMU's limits: 65535 bitmaps, a directory of at most 64 MiB. */
    private static final long MAX_DIRECTORY = 64L << 20;

    /** Host clusters the bitmaps use: the directory, each bitmap table and the bitmap data clusters. */
    static List<Long> clusters(BlockFile file, Header h) throws IOException {
        List<Long> out = new ArrayList<>();
        HeaderExtension ext = h.extension(HeaderExtension.BITMAPS);
        if (ext == null || ext.data().length < 24) {
            return out;
        }
        long cs = h.clusterSize();
        long nb = Be.u32(ext.data(), 0);
        long dirSize = Be.u64(ext.data(), 8);
        long dirOffset = Be.u64(ext.data(), 16);
        if (dirSize > MAX_DIRECTORY || dirSize < 0 || (dirOffset & (cs - 1)) != 0 || dirOffset + dirSize > file.size()) {
            throw FormatException.of(file.name(), "bitmaps extension: directory at " + dirOffset + " (" + dirSize
                    + " bytes) is not a valid table inside the file");
        }
        addRange(out, dirOffset, dirSize, cs);
        byte[] dir = new byte[(int) dirSize];
        file.readFully(ByteBuffer.wrap(dir), dirOffset);
        int pos = 0;
        for (long i = 0; i < nb && pos + 24 <= dir.length; i++) {
            long tableOffset = Be.u64(dir, pos);
            long tableSize = Be.u32(dir, pos + 8);
            int nameSize = Be.u16(dir, pos + 14);
            long extra = Be.u32(dir, pos + 16);
            pos += (int) ((24 + extra + nameSize + 7) & ~7L);
            if (tableOffset == 0 || (tableOffset & (cs - 1)) != 0 || tableSize * 8 > file.size()) {
                continue;
            }
            addRange(out, tableOffset, tableSize * 8, cs);
            long[] table = Images.readTable(file, tableOffset, (int) tableSize);
            for (long e : table) {
                long off = e & 0x00ff_ffff_ffff_fe00L;
                if (off != 0) {
                    out.add(off / cs);
                }
            }
        }
        return out;
    }

    private static void addRange(List<Long> out, long offset, long bytes, long cs) {
        if (bytes <= 0) {
            return;
        }
        for (long c = offset / cs; c <= (offset + bytes - 1) / cs; c++) {
            out.add(c);
        }
    }
}
