package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;

/** A running `qdedup serve` in its own JVM, as users run it (started in {@code dir}, stderr in serve.err there). */
class ServeProcess implements AutoCloseable {
    final Process p;
    final String uri;
    private final Path dir;

    ServeProcess(Path dir, String... args) throws Exception {
        this.dir = dir;
        List<String> cmd = new ArrayList<>(List.of(Path.of(System.getProperty("java.home"), "bin", "java").toString(),
                "--enable-native-access=ALL-UNNAMED", "-cp", System.getProperty("java.class.path"),
                "org.qdedup.cli.Main", "serve"));
        cmd.addAll(List.of(args));
        p = new ProcessBuilder(cmd).directory(dir.toFile()).redirectError(dir.resolve("serve.err").toFile()).start();
        BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8));
        String line = r.readLine();
        assertThat(line).as("ready line; stderr: %s", stderr()).isNotNull().startsWith("qdedup: serving ");
        uri = line.substring(line.indexOf(" on ") + 4);
    }

    String stderr() throws Exception {
        return Files.exists(dir.resolve("serve.err")) ? Files.readString(dir.resolve("serve.err")) : "";
    }

    /** SIGTERM: the server finishes, flushes, saves the index and exits 0. */
    int stop() throws Exception {
        p.toHandle().destroy();
        assertThat(p.waitFor(30, TimeUnit.SECONDS)).as("server exits after SIGTERM").isTrue();
        return p.exitValue();
    }

    /** kill -9: no flush, no index file, the dirty bit stays. */
    void kill9() throws Exception {
        p.destroyForcibly();
        assertThat(p.waitFor(30, TimeUnit.SECONDS)).as("server gone after SIGKILL").isTrue();
    }

    @Override
    public void close() {
        p.destroyForcibly();
    }
}
