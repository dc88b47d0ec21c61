package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.LinkOption;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.stream.Stream;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.io.FileBlockFile;

/**
 * dedup in place, estimate and stats on a real-data disk image: an ext4 file system holding the same tree twice,
 * made by mke2fs -d, copied into qcow2 by qemu-img.
 */
class DedupToolsTest {
    @TempDir
    static Path dir;
    static Path raw;

    @BeforeAll
    static void makeFileSystem() throws Exception {
        String mke2fs = Qemu.mke2fs(dir);
        Path tree = dir.resolve("tree");
        long budget = 20L << 20, copied = 0;
        Path root = Path.of("/usr/include");
        try (Stream<Path> walk = Files.walk(root)) {
            for (Path f : (Iterable<Path>) walk.sorted()::iterator) {
                if (copied >= budget) {
                    break;
                }
                if (!Files.isRegularFile(f, LinkOption.NOFOLLOW_LINKS) || !Files.isReadable(f)) {
                    continue;
                }
                for (String copy : List.of("a", "b")) { // the same files twice, as disks hold copies of things
                    Path to = tree.resolve(copy).resolve(root.relativize(f).toString());
                    Files.createDirectories(to.getParent());
                    Files.copy(f, to);
                }
                copied += Files.size(f);
            }
        }
        raw = dir.resolve("fs.raw");
        Qemu.Result mk = Qemu.exec(dir, List.of(mke2fs, "-q", "-t", "ext4", "-d", tree.toString(), raw.toString(), "96M"));
        assertThat(mk.exit()).as("mke2fs: %s%s", mk.out(), mk.err()).isZero();
    }

    /** Distinct non-zero clusters of the raw file, counted here independently of qdedup's code. */
    private static long distinctNonZero(int cs) throws Exception {
        byte[] all = Files.readAllBytes(raw);
        Set<String> seen = new HashSet<>();
        byte[] zero = new byte[cs];
        MessageDigest md = MessageDigest.getInstance("SHA-256");
        for (int off = 0; off < all.length; off += cs) {
            if (java.util.Arrays.equals(all, off, off + cs, zero, 0, cs)) {
                continue;
            }
            md.update(all, off, cs);
            seen.add(java.util.HexFormat.of().formatHex(md.digest()));
        }
        return seen.size();
    }

    private long hostClusters(String img, long cs) {
        return Qemu.hostClusters(dir, img, cs);
    }

    private static long num(Object json, Object... path) {
        return ((BigDecimal) Json.at(json, path)).longValueExact();
    }

    private long allocated(String img) throws Exception {
        try (FileBlockFile f = FileBlockFile.open(img, Path.of(img), false, FileBlockFile.Lock.NONE)) {
            return f.allocatedBytes();
        }
    }

    @Test
    void dedupInPlaceOfAQemuCopyStoresEachContentOnceAndGivesTheSpaceBack() throws Exception {
        String img = dir.resolve("q.qcow2").toString();
        Qemu.img(dir, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw.toString(), img);
        long before = allocated(img);
        long distinct = distinctNonZero(4096);
        long mappedBefore = hostClusters(img, 4096);
        assertThat(mappedBefore).as("the QEMU copy stores the duplicates").isGreaterThan(distinct + 1000);

        FormatMatrixTest.Run r = FormatMatrixTest.cli("dedup", img).ok();
        assertThat(r.out()).contains("shared");
        FormatMatrixTest.assertClean(dir, img);
        Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", img, raw.toString());
        assertThat(cmp.exit()).as("compare: %s", cmp.out()).isZero();
        assertThat(hostClusters(img, 4096)).as("stored data clusters = distinct non-zero clusters").isEqualTo(distinct);

        long freed = (mappedBefore - distinct) * 4096;
        long dropped = before - allocated(img);
        assertThat(dropped).as("du drop against the %d bytes freed", freed).isGreaterThanOrEqualTo(freed * 9 / 10);

        Object stats = Json.parse(FormatMatrixTest.cli("stats", "--output=json", img).ok().out());
        assertThat(Json.at(stats, "dedup")).isEqualTo(Boolean.TRUE);
        assertThat(num(stats, "data-clusters")).isEqualTo(distinct);
        assertThat(num(stats, "referenced-clusters")).isEqualTo(mappedBefore);
        assertThat(num(stats, "saved-bytes")).isEqualTo(freed);
        assertThat(num(stats, "index-entries")).isEqualTo(distinct);
        assertThat(Json.at(stats, "index-state")).isEqualTo("in-sync");
        assertThat(num(stats, "shared-clusters")).isPositive();
        // and the image goes on deduping what is written to it
        FormatMatrixTest.cli("dedup", img).ok();
        assertThat(hostClusters(img, 4096)).isEqualTo(distinct);
    }

    @Test
    void estimateAgreesWithWhatConvertDedupStoresAtEachClusterSize() throws Exception {
        Object est = Json.parse(FormatMatrixTest.cli("estimate", "--output=json", "--cluster-size", "4k,16k,64k",
                raw.toString()).ok().out());
        long[] sizes = {4096, 16384, 65536};
        for (int k = 0; k < sizes.length; k++) {
            long cs = sizes[k];
            assertThat(num(est, k, "cluster-size")).isEqualTo(cs);
            long distinct = distinctNonZero((int) cs);
            assertThat(num(est, k, "distinct-clusters")).as("distinct at %d", cs).isEqualTo(distinct);
            assertThat(num(est, k, "data-clusters") + num(est, k, "zero-clusters")).isEqualTo(Files.size(raw) / cs);
            String img = dir.resolve("c" + cs + ".qcow2").toString();
            FormatMatrixTest.cli("convert", "--dedup", "-O", "qcow2", "-o", "cluster_size=" + cs, raw.toString(), img).ok();
            assertThat(hostClusters(img, cs)).as("convert --dedup at %d stores what estimate said", cs).isEqualTo(distinct);
            Object stats = Json.parse(FormatMatrixTest.cli("stats", "--output=json", img).ok().out());
            assertThat(num(stats, "saved-bytes")).as("saved at %d", cs).isEqualTo(num(est, k, "saved-bytes"));
            FormatMatrixTest.assertClean(dir, img);
            Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", img, raw.toString());
            assertThat(cmp.exit()).as("compare at %d: %s", cs, cmp.out()).isZero();
        }
        assertThat(num(est, 0, "saved-bytes")).as("the tree copied twice saves at 4 KiB").isGreaterThan(5L << 20);
    }

    @Test
    void estimateRejectsBadClusterSizesAndStatsOfAPlainImage() throws Exception {
        FormatMatrixTest.cli("estimate", "--cluster-size", "3k", raw.toString()).failsWithOneLine();
        String img = dir.resolve("plain.qcow2").toString();
        Qemu.img(dir, "create", "-f", "qcow2", img, "1M");
        Qemu.io(dir, "qcow2", img, List.of("write -P 7 0 64k", "write -z 64k 64k"));
        Object stats = Json.parse(FormatMatrixTest.cli("stats", "--output=json", img).ok().out());
        assertThat(Json.at(stats, "dedup")).isEqualTo(Boolean.FALSE);
        assertThat(num(stats, "data-clusters")).isEqualTo(1);
        assertThat(num(stats, "zero-clusters")).isEqualTo(1);
        assertThat(Json.at(stats, "index-state")).isEqualTo("absent");
        assertThat(num(stats, "index-bytes")).isZero();
    }
}
