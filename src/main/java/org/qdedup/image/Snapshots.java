package org.qdedup.image;

import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import org.qdedup.format.Be;
import org.qdedup.format.Header;
import org.qdedup.format.L2Entry;
import org.qdedup.format.Snapshot;

/** Internal snapshots: create, apply (revert to), delete — with QEMU's table format and refcount rules. */
public final class Snapshots {
    private Snapshots() {
    }

    private static Snapshot find(ImageEditor ed, String name) throws IOException {
        for (Snapshot s : ed.snapshots) {
            if (s.name().equals(name) || s.id().equals(name)) {
                return s;
            }
        }
        throw new IOException(ed.file.name() + ": snapshot '" + name + "' not found");
    }

    /**
     * Creates a snapshot of the active layer: a copy of the L1 table, one more reference on every L2 table and data
     * cluster it reaches, COPIED cleared where clusters become shared.
     */
    public static void create(String image, String name) throws IOException {
        try (ImageEditor ed = ImageEditor.open(image)) {
            create(ed, name);
        }
    }

    static void create(ImageEditor ed, String name) throws IOException {
        for (Snapshot s : ed.snapshots) {
            if (s.name().equals(name)) {
                throw new IOException(ed.file.name() + ": a snapshot named '" + name + "' already exists");
            }
        }
        if (ed.h.hasDataFile()) {
            throw new IOException(ed.file.name() + ": images with an external data file cannot have internal snapshots");
        }
        if (ed.snapshots.size() >= Header.MAX_SNAPSHOTS) {
            throw new IOException(ed.file.name() + ": too many snapshots (" + Header.MAX_SNAPSHOTS + ")");
        }
        long[] l1 = ed.activeL1();
        List<Long> refs = ed.referencesOf(l1);
        ed.checkCanAdd(refs, "create snapshot '" + name + "'");
        // 1. References first: refcounts up and on disk.
        ed.addAll(refs);
        ed.syncRefcounts();
        // 2. The snapshot's copy of the L1 table.
        long l1Copy = ed.allocateTable(8L * l1.length);
        ed.writeTable(l1Copy, l1);
        ed.file.flush();
        // 3. The table entry that publishes it.
        long maxId = 0;
        for (Snapshot s : ed.snapshots) {
            try {
                maxId = Math.max(maxId, Long.parseLong(s.id()));
            } catch (NumberFormatException ignored) {
                // non-numeric ids do not take part in numbering
            }
        }
        long now = System.currentTimeMillis();
        byte[] extra = new byte[24];
        Be.put64(extra, 0, 0); // vm state size (64-bit)
        Be.put64(extra, 8, ed.h.size());
        Be.put64(extra, 16, 0); // icount, as qemu-img records it
        Snapshot sn = new Snapshot(l1Copy, l1.length, Long.toString(maxId + 1), name, now / 1000, (now % 1000) * 1_000_000L,
                0, 0, extra);
        List<Snapshot> table = new ArrayList<>(ed.snapshots);
        table.add(sn);
        ed.writeSnapshotTable(table);
        // 4. Shared now: COPIED off in the active tables.
        ed.fixCopied();
        ed.giveBack();
    }

    /** Deletes a snapshot: drops its table entry, then its references. */
    public static void delete(String image, String name) throws IOException {
        try (ImageEditor ed = ImageEditor.open(image)) {
            Snapshot s = find(ed, name);
            List<Snapshot> table = new ArrayList<>(ed.snapshots);
            table.remove(s);
            List<Long> refs = ed.referencesOf(ed.readTable(s.l1TableOffset(), s.l1Size()));
            ed.writeSnapshotTable(table);
            ed.dropAll(refs);
            ed.freeTable(s.l1TableOffset(), 8L * s.l1Size());
            ed.syncRefcounts();
            ed.fixCopied();
            ed.giveBack();
        }
    }

    /** Reverts the active layer to a snapshot (which stays). */
    public static void apply(String image, String name) throws IOException {
        try (ImageEditor ed = ImageEditor.open(image)) {
            Snapshot s = find(ed, name);
            long[] snapL1 = ed.readTable(s.l1TableOffset(), s.l1Size());
            long[] oldL1 = ed.activeL1();
            List<Long> add = ed.referencesOf(snapL1);
            List<Long> drop = ed.referencesOf(oldL1);
            ed.checkCanAdd(add, "apply snapshot '" + name + "'");
            ed.addAll(add);
            ed.syncRefcounts();
            long size = s.diskSize() >= 0 ? s.diskSize() : ed.h.size();
            int entries = Math.max(s.l1Size(), (int) ed.geo.l1EntriesFor(size));
            long[] newL1 = java.util.Arrays.copyOf(snapL1, entries);
            for (int i = 0; i < newL1.length; i++) {
                newL1[i] &= ~L2Entry.COPIED; // recomputed below
            }
            long l1Off = ed.h.l1TableOffset();
            long l1Bytes = 8L * Math.max(1, ed.h.l1Size());
            boolean fits = (8L * entries + ed.cs - 1) / ed.cs <= (l1Bytes + ed.cs - 1) / ed.cs;
            if (fits) {
                long[] padded = java.util.Arrays.copyOf(newL1, (int) Math.max(entries, ed.h.l1Size()));
                ed.writeTable(l1Off, padded);
                ed.file.flush();
                ed.writeHeader(ed.h.withSize(size).withL1(l1Off, entries));
            } else {
                long off = ed.allocateTable(8L * entries);
                ed.writeTable(off, newL1);
                ed.file.flush();
                ed.writeHeader(ed.h.withSize(size).withL1(off, entries));
                ed.freeTable(l1Off, l1Bytes);
            }
            ed.dropAll(drop);
            ed.syncRefcounts();
            ed.fixCopied();
            ed.giveBack();
        }
    }
}
