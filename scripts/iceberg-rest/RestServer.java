// Apache Iceberg's REST catalog server from its test fixtures (the
// servlet and adapter of iceberg-core's test jar, the reference server of
// the REST spec), on one address only: the fixture's own launcher listens
// on every interface. The backend catalog is configured as the fixture's
// is, from CATALOG_* variables: CATALOG_S3_ENDPOINT is `s3.endpoint`,
// CATALOG_IO__IMPL is `io-impl`.
//
// usage: java -cp CLASSES:LIBS/* RestServer HOST PORT

import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import org.apache.iceberg.CatalogUtil;
import org.apache.iceberg.catalog.Catalog;
import org.apache.iceberg.rest.RESTCatalogAdapter;
import org.apache.iceberg.rest.RESTCatalogServlet;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;

public class RestServer {
  public static void main(String[] args) throws Exception {
    String host = args[0];
    int port = Integer.parseInt(args[1]);
    Map<String, String> props = new HashMap<>();
    for (Map.Entry<String, String> e : System.getenv().entrySet()) {
      if (e.getKey().startsWith("CATALOG_")) {
        String key = e.getKey().substring("CATALOG_".length()).toLowerCase(Locale.ROOT)
            .replace("__", "-").replace("_", ".");
        props.put(key, e.getValue());
      }
    }
    Catalog backend = CatalogUtil.buildIcebergCatalog(
        "rest_backend", props, new org.apache.hadoop.conf.Configuration());
    ServletContextHandler context = new ServletContextHandler(ServletContextHandler.NO_SESSIONS);
    context.addServlet(new ServletHolder(new RESTCatalogServlet(new RESTCatalogAdapter(backend))), "/*");
    Server server = new Server();
    ServerConnector connector = new ServerConnector(server);
    connector.setHost(host);
    connector.setPort(port);
    server.addConnector(connector);
    server.setHandler(context);
    server.start();
    server.join();
  }
}
