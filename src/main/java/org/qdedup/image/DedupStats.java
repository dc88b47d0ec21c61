package org.qdedup.image;

import java.io.IOException;
import java.util.BitSet;
import org.qdedup.format.L2Entry;

/**
 * What dedup achieved in an image's active layer, from its tables and refcounts alone (no data is read).
 *
 * @param dataClusters       host clusters holding data of the active layer
 * @param referencedClusters guest clusters mapped to data
 * @param zeroClusters       guest clusters with the zero flag
 * @param sharedClusters     of the data clusters, those with refcount >= 2
 * @param indexEntries       entries the dedup index holds for this image (its data clusters)
 * @param indexBytes         RAM of the dedup index with that many entries
 * @param indexState         in-sync, rebuilt or absent (see {@link DedupIndexFile})
 */
public record DedupStats(long virtualSize, long clusterSize, boolean dedup, long dataClusters, long referencedClusters,
                         long zeroClusters, long sharedClusters, long indexEntries, long indexBytes, String indexState) {

    public long savedBytes() {
        return Math.max(0, referencedClusters - dataClusters) * clusterSize;
    }

    public double dedupRatio() {
        return dataClusters == 0 ? 1.0 : (double) referencedClusters / dataClusters;
    }

    public static DedupStats of(Qcow2Image img) throws IOException {
        long cs = img.header().clusterSize();
        int step = img.geometry().extendedL2() ? 2 : 1;
        int entries = img.geometry().l2Entries();
        BitSet seen = new BitSet();
        long data = 0, referenced = 0, zero = 0, shared = 0, maxCluster = 0;
        boolean external = img.header().hasDataFile();
        for (int i = 0; i < img.l1.length; i++) {
            long l2 = img.l1[i] & L2Entry.L1_OFFSET_MASK;
            if (l2 == 0) {
                continue;
            }
            long[] t = img.l2Table(l2, i);
            for (int j = 0; j < entries; j++) {
                long e = t[j * step];
                if ((e & L2Entry.ZERO) != 0 && !L2Entry.isCompressed(e)) {
                    zero++;
                    continue;
                }
                long host = L2Entry.isCompressed(e) ? L2Entry.compressedOffset(e, img.header().clusterBits())
                        : e & L2Entry.OFFSET_MASK;
                if (host == 0 && !(external && !L2Entry.isCompressed(e) && (e & L2Entry.COPIED) != 0)) {
                    continue;
                }
                referenced++;
                long c = host / cs;
                if (c > Integer.MAX_VALUE - 1 || seen.get((int) c)) {
                    continue;
                }
                seen.set((int) c);
                data++;
                maxCluster = Math.max(maxCluster, c);
                if (!external && img.refcounts().get(c) >= 2) {
                    shared++;
                }
            }
        }
        String state = img.header().dedup() ? DedupIndexFile.find(img.file(), img.header()).state() : "absent";
        long indexBytes = img.header().dedup() ? org.qdedup.dedup.DedupIndex.memoryBytesFor(data, maxCluster) : 0;
        return new DedupStats(img.size(), cs, img.header().dedup(), data, referenced, zero, shared,
                img.header().dedup() ? data : 0, indexBytes, state);
    }
}
