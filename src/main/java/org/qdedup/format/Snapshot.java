package org.qdedup.format;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/** One internal snapshot table entry; unknown extra data is kept. */
public record Snapshot(long l1TableOffset, int l1Size, String id, String name, long dateSec, long dateNsec,
                       long vmClockNsec, long vmStateSize, byte[] extraData) {

    /** Disk size stored in the extra data (v3), or -1 when the entry is too old to have it. */
    public long diskSize() {
        return extraData.length >= 16 ? Be.u64(extraData, 8) : -1;
    }

    /** 64-bit VM state size from the extra data, when present. */
    public long vmStateSize64() {
        return extraData.length >= 8 ? Be.u64(extraData, 0) : vmStateSize;
    }

    /** Instruction count from extra data (bytes 16..23), or -1 when absent (QEMU prints it only when present). */
    public long icount() {
        return extraData.length >= 24 ? Be.u64(extraData, 16) : -1;
    }

    /** Maximum bytes of one snapshot table (QEMU's QCOW_MAX_SNAPSHOTS_SIZE). */
    public static final long MAX_TABLE_BYTES = 64L << 20;

    /**
     * Decodes {@code count} entries from the table bytes read at {@code tableOffset}.
     * The caller reads at most {@link #MAX_TABLE_BYTES}; entries running past the bytes are an error.
     */
    public static List<Snapshot> decodeTable(String file, byte[] table, long tableOffset, int count, long clusterSize,
                                             long fileSize, long maxL1Entries) throws FormatException {
        List<Snapshot> out = new ArrayList<>(Math.min(count, 1024));
        int pos = 0;
        for (int i = 0; i < count; i++) {
            long at = tableOffset + pos;
            if (pos + 40 > table.length) {
                throw FormatException.at(file, "snapshot table entry " + i, at, "40 header bytes in the table", (table.length - pos) + " bytes");
            }
            long l1Off = Be.u64(table, pos);
            long l1Size = Be.u32(table, pos + 8);
            int idLen = Be.u16(table, pos + 12);
            int nameLen = Be.u16(table, pos + 14);
            long dateSec = Be.u32(table, pos + 16);
            long dateNsec = Be.u32(table, pos + 20);
            long vmClock = Be.u64(table, pos + 24);
            long vmState = Be.u32(table, pos + 32);
            long extraLen = Be.u32(table, pos + 36);
            pos += 40;
            if (extraLen > 1024) {
                throw FormatException.at(file, "snapshot table entry " + i + " extra_data_size", at + 36, "at most 1024", Long.toString(extraLen));
            }
            if (pos + extraLen + idLen + nameLen > table.length) {
                throw FormatException.at(file, "snapshot table entry " + i, at, "an entry inside the snapshot table",
                        (40 + extraLen + idLen + nameLen) + " bytes running past it");
            }
            byte[] extra = Arrays.copyOfRange(table, pos, pos + (int) extraLen);
            pos += (int) extraLen;
            String id = new String(table, pos, idLen, StandardCharsets.UTF_8);
            pos += idLen;
            String name = new String(table, pos, nameLen, StandardCharsets.UTF_8);
            pos += nameLen;
            pos = (pos + 7) & ~7;
            if (maxL1Entries < 0) {
                // Check mode: the caller judges each entry's L1 table itself.
                out.add(new Snapshot(l1Off, (int) Math.min(l1Size, Integer.MAX_VALUE), id, name, dateSec, dateNsec, vmClock, vmState, extra));
                continue;
            }
            if (l1Size > maxL1Entries) {
                throw FormatException.at(file, "snapshot '" + name + "' l1_size", at + 8, "at most " + maxL1Entries, Long.toString(l1Size));
            }
            if (l1Size > 0 && (l1Off <= 0 || (l1Off & (clusterSize - 1)) != 0 || l1Off > fileSize || l1Size * 8 > fileSize - l1Off)) {
                throw FormatException.at(file, "snapshot '" + name + "' L1 table offset", at,
                        "a cluster-aligned table inside the file (" + fileSize + " bytes)", Long.toUnsignedString(l1Off));
            }
            out.add(new Snapshot(l1Off, (int) l1Size, id, name, dateSec, dateNsec, vmClock, vmState, extra));
        }
        return out;
    }

    /** Encoded size of one entry, padded to 8. */
    public int encodedLength() {
        int len = 40 + extraData.length + id.getBytes(StandardCharsets.UTF_8).length + name.getBytes(StandardCharsets.UTF_8).length;
        return (len + 7) & ~7;
    }

    public void encode(byte[] out, int pos) {
        byte[] idb = id.getBytes(StandardCharsets.UTF_8);
        byte[] nb = name.getBytes(StandardCharsets.UTF_8);
        Be.put64(out, pos, l1TableOffset);
        Be.put32(out, pos + 8, l1Size);
        Be.put16(out, pos + 12, idb.length);
        Be.put16(out, pos + 14, nb.length);
        Be.put32(out, pos + 16, dateSec);
        Be.put32(out, pos + 20, dateNsec);
        Be.put64(out, pos + 24, vmClockNsec);
        Be.put32(out, pos + 32, vmStateSize);
        Be.put32(out, pos + 36, extraData.length);
        int p = pos + 40;
        System.arraycopy(extraData, 0, out, p, extraData.length);
        p += extraData.length;
        System.arraycopy(idb, 0, out, p, idb.length);
        p += idb.length;
        System.arraycopy(nb, 0, out, p, nb.length);
    }
}
