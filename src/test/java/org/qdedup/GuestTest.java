package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.PosixFilePermissions;
import java.security.MessageDigest;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * guest/run.sh: Debian's kernel under qemu-system-x86_64 (TCG) makes ext4 on the export, writes copies and unique
 * data buffered and with O_DIRECT (4 KiB and 512 B), patches inside blocks, deletes, fstrims and verifies across a
 * remount and e2fsck. Skipped only where qemu-system-x86_64 is missing (bin/test installs it).
 */
class GuestTest {
    private static final int CS = 4096;
    /** The guest's one result line; anything else on the console is not read. */
    private static final Pattern GUEST_LINE = Pattern.compile("(?m)^QDEDUP-GUEST: .*$");
    private static final Pattern PASS = Pattern.compile("QDEDUP-GUEST: PASS files=\\d+ kib=\\d+ trimmed=[1-9]\\d* seconds=\\d+");
    private static final Pattern RESULT = Pattern.compile("(?m)^guest-result: server=(\\S+) pass=yes check=clean seconds=\\d+"
            + " guest-seconds=\\d+ stored-clusters=(\\d+) distinct-nonzero-clusters=(\\d+)$");
    /** The script bounds qemu at 900 s; this covers the rest (fetching the kernel on a first run, the server). */
    private static final long TIMEOUT_SECONDS = 1200;

    @TempDir
    Path dir;

    @BeforeAll
    static void needsQemuSystem() {
        Qemu.Result which = Qemu.exec(null, List.of("sh", "-c", "command -v qemu-system-x86_64"));
        assumeTrue(which.exit() == 0, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
    }

    /** Runs guest/run.sh --server SERVER; returns its stdout after checking the guest's line and the script's. */
    private Matcher guest(String server) throws IOException {
        // qdedup as this build has it: the test class path in a JVM of its own, as a command the script can run
        Path qdedup = dir.resolve("qdedup-command");
        Files.writeString(qdedup, "#!/bin/sh\nexec '" + Path.of(System.getProperty("java.home"), "bin", "java")
                + "' --enable-native-access=ALL-UNNAMED -cp '" + System.getProperty("java.class.path")
                + "' org.qdedup.cli.Main \"$@\"\n");
        Files.setPosixFilePermissions(qdedup, PosixFilePermissions.fromString("rwxr-xr-x"));
        String script = Path.of("guest", "run.sh").toAbsolutePath().toString();
        Qemu.Result r = Qemu.exec(dir, List.of("bash", script, "--server", server, "--dir", dir.resolve(server).toString()),
                Map.of("QDEDUP", qdedup.toString()), TIMEOUT_SECONDS);
        String all = r.out() + r.err();
        List<String> lines = GUEST_LINE.matcher(r.out()).results().map(m -> m.group()).toList();
        assertThat(lines).as("the guest's result lines; script output:%n%s", all).hasSize(1);
        assertThat(lines.getFirst()).as("the guest's result; script output:%n%s", all).matches(PASS);
        assertThat(r.exit()).as("guest/run.sh exit; output:%n%s", all).isZero();
        Matcher m = RESULT.matcher(r.out());
        assertThat(m.find()).as("guest-result line in:%n%s", all).isTrue();
        assertThat(m.group(1)).isEqualTo(server);
        return m;
    }

    /** Distinct non-zero contents of the image's 4 KiB guest clusters, read through qemu-img. */
    private long distinctNonZeroClusters(String img) throws Exception {
        Path raw = dir.resolve("disk.raw");
        Qemu.img(dir, "convert", "-f", "qcow2", "-O", "raw", img, raw.toString());
        Set<ByteBuffer> seen = new HashSet<>();
        MessageDigest sha = MessageDigest.getInstance("SHA-256");
        byte[] block = new byte[CS], zero = new byte[CS];
        try (InputStream in = Files.newInputStream(raw)) {
            while (in.readNBytes(block, 0, CS) == CS) {
                if (!java.util.Arrays.equals(block, zero)) {
                    seen.add(ByteBuffer.wrap(sha.digest(block)));
                }
            }
        }
        Files.delete(raw);
        return seen.size();
    }

    @Test
    void ext4GuestOnQdedupServeStoresEachDistinctClusterOnce() throws Exception {
        Matcher m = guest("qdedup");
        String img = dir.resolve("qdedup/disk.qcow2").toString();
        FormatMatrixTest.assertClean(dir, img);
        long distinct = distinctNonZeroClusters(img);
        assertThat(Long.parseLong(m.group(3))).as("distinct non-zero clusters, the script's count").isEqualTo(distinct);
        assertThat(Qemu.hostClusters(dir, img, CS)).as("data clusters stored").isEqualTo(distinct);
        assertThat(Long.parseLong(m.group(2))).isEqualTo(distinct);
        // what the guest sent: copies, 512 B writes inside clusters, discards, flushes; the index saved at exit
        Object metrics = Json.parse(Files.readString(dir.resolve("qdedup/metrics.json")));
        for (String counter : List.of("dedup-hits", "unaligned-rmw", "trims", "flushes", "shared-clusters")) {
            assertThat(((Number) Json.at(metrics, counter)).longValue()).as(counter).isPositive();
        }
        assertThat(Json.at(metrics, "index-state")).isEqualTo("in-sync");
        assertThat(FormatMatrixTest.cli("check", img).out()).contains("Dedup index: in sync");
    }

    @Test
    void theSameGuestPassesOnQemuNbd() throws Exception {
        Matcher m = guest("qemu-nbd");
        String img = dir.resolve("qemu-nbd/disk.qcow2").toString();
        long distinct = distinctNonZeroClusters(img);
        assertThat(Long.parseLong(m.group(3))).isEqualTo(distinct);
        // no dedup: every copy has clusters of its own
        assertThat(Qemu.hostClusters(dir, img, CS)).isEqualTo(Long.parseLong(m.group(2))).isGreaterThan(distinct + 1000);
    }
}
