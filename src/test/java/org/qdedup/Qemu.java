package org.qdedup;

import static org.assertj.core.api.Assertions.fail;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;

/** Runs qemu-img / qemu-io (QEMU 7.2, the oracle) with a timeout; failures carry the command and its stderr. */
final class Qemu {
    /** Generous per-command limit: every image here is a few MiB. */
    static final long TIMEOUT_SECONDS = 60;

    private Qemu() {
    }

    record Result(List<String> command, int exit, String out, String err) {
        Result ok() {
            if (exit != 0) {
                fail("%s exited %d%nstderr: %s%nstdout: %s", String.join(" ", command), exit, err, out);
            }
            return this;
        }
    }

    /** Runs a command in {@code dir} (null: the JVM's directory) and returns whatever it did. */
    static Result exec(Path dir, List<String> command) {
        return exec(dir, command, Map.of(), TIMEOUT_SECONDS);
    }

    /** {@link #exec(Path, List)} with more environment variables and another time limit. */
    static Result exec(Path dir, List<String> command, Map<String, String> env, long timeoutSeconds) {
        ProcessBuilder pb = new ProcessBuilder(command);
        if (dir != null) {
            pb.directory(dir.toFile());
        }
        // Fixed locale and time zone so that human output (dates in `snapshot -l`) is comparable.
        pb.environment().put("LC_ALL", "C");
        pb.environment().putAll(env);
        Process p;
        try {
            p = pb.start();
        } catch (IOException e) {
            throw new UncheckedIOException("cannot start " + command, e);
        }
        try {
            p.getOutputStream().close();
            CompletableFuture<String> out = drain(p.getInputStream());
            CompletableFuture<String> err = drain(p.getErrorStream());
            if (!p.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
                p.descendants().forEach(ProcessHandle::destroyForcibly); // a script's servers and emulators too
                p.destroyForcibly();
                fail("%s timed out after %d s", String.join(" ", command), timeoutSeconds);
            }
            return new Result(command, p.exitValue(), out.join(), err.join());
        } catch (InterruptedException e) {
            p.destroyForcibly();
            Thread.currentThread().interrupt();
            throw new AssertionError("interrupted running " + command, e);
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    private static CompletableFuture<String> drain(InputStream in) {
        return CompletableFuture.supplyAsync(() -> {
            try (in) {
                ByteArrayOutputStream b = new ByteArrayOutputStream();
                in.transferTo(b);
                return b.toString(StandardCharsets.UTF_8);
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        });
    }

    /** {@code qemu-img ARGS}, whatever its exit code. */
    static Result imgRaw(Path dir, String... args) {
        List<String> cmd = new ArrayList<>();
        cmd.add("qemu-img");
        cmd.addAll(Arrays.asList(args));
        return exec(dir, cmd);
    }

    /** {@code qemu-img ARGS}, which must exit 0; returns its stdout. */
    static String img(Path dir, String... args) {
        return imgRaw(dir, args).ok().out();
    }

    /** {@code qemu-io -f FMT -c CMD... IMG}, all commands in one process; must exit 0 (qemu-io exits 1 if any failed). */
    static String io(Path dir, String fmt, String image, List<String> commands) {
        return io(dir, null, fmt, image, commands);
    }

    /** {@link #io} with a cache mode ({@code -t}, null for qemu-io's default); {@code none} writes around the cache. */
    static String io(Path dir, String cache, String fmt, String image, List<String> commands) {
        List<String> cmd = new ArrayList<>();
        cmd.add("qemu-io");
        if (cache != null) {
            cmd.add("-t");
            cmd.add(cache);
        }
        cmd.add("-f");
        cmd.add(fmt);
        for (String c : commands) {
            cmd.add("-c");
            cmd.add(c);
        }
        cmd.add(image);
        Result r = exec(dir, cmd).ok();
        if (r.out().contains("failed") || r.err().contains("failed")) {
            fail("qemu-io reported a failed command on %s:%n%s%n%s", image, r.out(), r.err());
        }
        return r.out();
    }

    /** The mke2fs binary (e2fsprogs), failing the test with the install hint when it is missing. */
    static String mke2fs(Path dir) {
        Result which = exec(dir, List.of("sh", "-c", "command -v mke2fs || ls /usr/sbin/mke2fs /sbin/mke2fs"));
        if (which.exit() != 0) {
            org.assertj.core.api.Assertions.fail("mke2fs not found: apt-get install -y e2fsprogs");
        }
        return which.out().strip().lines().findFirst().orElseThrow();
    }

    /** Host clusters that qemu-img map shows the active layer of an image using. */
    static long hostClusters(Path dir, String img, long cs) {
        java.util.Set<Long> hosts = new java.util.HashSet<>();
        java.util.regex.Matcher m = java.util.regex.Pattern.compile("\"length\": (\\d+),.*\"data\": true, \"offset\": (\\d+)")
                .matcher(img(dir, "map", "--output=json", img));
        while (m.find()) {
            long len = Long.parseLong(m.group(1)), off = Long.parseLong(m.group(2));
            for (long o = off; o < off + len; o += cs) {
                hosts.add(o / cs);
            }
        }
        return hosts.size();
    }
}
